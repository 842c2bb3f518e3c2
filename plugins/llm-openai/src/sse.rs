//! An incremental parser of server-sent events: bytes go in as they arrive, split anywhere (even
//! inside a line or a UTF-8 character); each event's data comes out once the blank line that
//! ends it has arrived.
//!
//! Rules (the WHATWG `text/event-stream` format): lines end with `\n`, `\r\n` or `\r`; a line
//! `data: x` (one optional space after the colon) adds `x` to the event's data, several `data`
//! lines joined by `\n`; lines starting with `:` are comments; other fields (`event`, `id`,
//! `retry`) are ignored; a blank line ends the event, and an event without data is skipped. An
//! event the stream ends in the middle of is dropped, as the format says.

/// The parser's state between chunks.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The bytes of the line being read.
    line: Vec<u8>,
    /// The data of the event being read, if it has a `data` line yet.
    data: Option<String>,
    /// The last byte was `\r`: a `\n` right after it ends no new line.
    after_cr: bool,
}

impl SseParser {
    /// Feeds `bytes` and returns the data of every event they complete, in order; an error
    /// says which line is not UTF-8.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, String> {
        let mut events = Vec::new();
        for &byte in bytes {
            let after_cr = std::mem::replace(&mut self.after_cr, byte == b'\r');
            match byte {
                b'\n' if after_cr => {}
                b'\n' | b'\r' => {
                    let line = std::mem::take(&mut self.line);
                    let line = String::from_utf8(line).map_err(|e| {
                        format!(
                            "a line is not UTF-8: {}",
                            String::from_utf8_lossy(e.as_bytes()).chars().take(80).collect::<String>()
                        )
                    })?;
                    if let Some(data) = self.line_ended(&line) {
                        events.push(data);
                    }
                }
                _ => self.line.push(byte),
            }
        }
        Ok(events)
    }

    /// Takes in a whole line; returns the event's data when the line ends an event.
    fn line_ended(&mut self, line: &str) -> Option<String> {
        if line.is_empty() {
            return self.data.take();
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        if field == "data" {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_whole_however_the_bytes_are_split() {
        let stream = "data: {\"a\":\"é\"}\n\n: a comment\r\nevent: x\r\ndata:1\r\ndata: 2\r\n\r\ndata: [DONE]\r\rdata: cut";
        let expected = vec!["{\"a\":\"é\"}".to_string(), "1\n2".into(), "[DONE]".into()];
        for split in 0..stream.len() {
            let mut parser = SseParser::default();
            let (a, b) = stream.as_bytes().split_at(split);
            let mut events = parser.push(a).unwrap();
            events.extend(parser.push(b).unwrap());
            assert_eq!(events, expected, "split at {split}");
        }
        let mut parser = SseParser::default();
        let one_by_one: Vec<String> = stream.bytes().flat_map(|b| parser.push(&[b]).unwrap()).collect();
        assert_eq!(one_by_one, expected);
    }

    #[test]
    fn a_line_that_is_not_utf8_is_an_error() {
        let error = SseParser::default().push(b"data: \xff\xfe\n\n").unwrap_err();
        assert!(error.starts_with("a line is not UTF-8: data: "), "{error}");
    }

    #[test]
    fn events_without_data_are_skipped() {
        assert_eq!(SseParser::default().push(b"event: ping\n\n:keep-alive\n\ndata\n\n").unwrap(), vec![String::new()]);
    }
}
