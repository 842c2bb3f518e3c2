//! The server's deterministic "model": a completion is a sequence of words chosen by a hash of
//! the prompt, one word a token.

/// The words completions are made of.
const WORDS: [&str; 32] = [
    "the", "rabbit", "ran", "under", "a", "silver", "moon", "while", "Alice", "watched", "quietly", "from", "garden", "wall",
    "and", "tea", "grew", "cold", "in", "curious", "small", "door", "opened", "onto", "long", "hall", "of", "lamps", "where",
    "clocks", "sang", "softly",
];

/// The number of tokens in `text`: its whitespace-separated words.
pub fn count_tokens(text: &str) -> u32 {
    text.split_whitespace().count() as u32
}

/// The completion of `prompt` in at most `max_tokens` tokens (at least one): between 24 and 87
/// words in sentences of at least six words (but the last), the first word without a leading space. Concatenated, the tokens are the
/// completion's text, and [`count_tokens`] of it is their number.
pub fn completion(prompt: &str, max_tokens: u32) -> Vec<String> {
    let seed = hash(prompt);
    let length = (24 + seed % 64).min(u64::from(max_tokens.max(1)));
    let mut sentence_words = 0;
    (0..length)
        .map(|i| {
            let mut token = word(seed, i);
            if sentence_words == 0 {
                let at = usize::from(i > 0);
                token[at..at + 1].make_ascii_uppercase();
            }
            sentence_words += 1;
            if i + 1 == length || (sentence_words >= 6 && mix(seed ^ i).is_multiple_of(4)) {
                token.push('.');
                sentence_words = 0;
            }
            token
        })
        .collect()
}

/// Token `i` of the endless sequence that seed `seed` starts: a word, with a leading space
/// after the first.
pub(crate) fn word(seed: u64, i: u64) -> String {
    let word = WORDS[(mix(seed.wrapping_add(i)) % WORDS.len() as u64) as usize];
    if i == 0 { word.to_string() } else { format!(" {word}") }
}

/// SplitMix64's mixing function.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stable 64-bit hash (FNV-1a) of `text`.
pub(crate) fn hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_is_deterministic_bounded_and_counts_one_token_a_word() {
        let tokens = completion("A storm at sea", 1000);
        assert_eq!(tokens, completion("A storm at sea", 1000));
        assert!((24..88).contains(&tokens.len()), "{tokens:?}");
        let text = tokens.concat();
        assert_eq!(count_tokens(&text) as usize, tokens.len());
        assert!(text.ends_with('.') && text.starts_with(|c: char| c.is_ascii_uppercase()), "{text}");
        assert_eq!(completion("A storm at sea", 3).len(), 3);
        assert_eq!(completion("A storm at sea", 0).len(), 1);
        assert_ne!(completion("A calm at sea", 1000), tokens);
    }
}
