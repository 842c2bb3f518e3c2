//! Prompt templates of pipeline steps: `{prompt}` is the run's prompt and `{steps.ID.output}` the
//! text output of an earlier step; `{{` and `}}` stand for literal braces.

/// A parsed prompt template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Prompt,
    StepOutput(String),
}

impl Template {
    /// Parses `text`; the error says which placeholder is wrong and what is allowed.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(i) = rest.find(['{', '}']) {
            literal.push_str(&rest[..i]);
            let tail = &rest[i..];
            if let Some(after) = tail.strip_prefix("{{").or_else(|| tail.strip_prefix("}}")) {
                literal.push_str(&tail[..1]);
                rest = after;
                continue;
            }
            let Some(end) = tail.find('}').filter(|_| tail.starts_with('{')) else {
                return Err(format!("unmatched '}}' in \"{text}\"; write '}}}}' for a literal brace"));
            };
            let name = &tail[1..end];
            let part = match name.split('.').collect::<Vec<_>>().as_slice() {
                ["prompt"] => Part::Prompt,
                ["steps", id, "output"] if !id.is_empty() => Part::StepOutput(id.to_string()),
                _ => {
                    return Err(format!(
                        "unknown placeholder '{{{name}}}'; use {{prompt}} or {{steps.ID.output}} \
                         (write '{{{{' for a literal brace)"
                    ));
                }
            };
            if !literal.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut literal)));
            }
            parts.push(part);
            rest = &tail[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template { parts })
    }

    /// Ids of the steps whose output the template uses.
    pub fn step_refs(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::StepOutput(id) => Some(id.as_str()),
            _ => None,
        })
    }

    /// Fills in the template; `output` gives a step's text output by id.
    pub fn render<'a>(&self, prompt: &str, output: impl Fn(&str) -> Option<&'a str>) -> String {
        let mut text = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => text.push_str(t),
                Part::Prompt => text.push_str(prompt),
                Part::StepOutput(id) => text.push_str(output(id).unwrap_or_default()),
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prompt_and_step_outputs() {
        let t = Template::parse("Draw {{this}}: {prompt} / {steps.text.output}").unwrap();
        assert_eq!(t.step_refs().collect::<Vec<_>>(), ["text"]);
        let rendered = t.render("a cat", |id| (id == "text").then_some("once upon a time"));
        assert_eq!(rendered, "Draw {this}: a cat / once upon a time");
    }

    #[test]
    fn refuses_unknown_placeholders_and_stray_braces() {
        assert!(Template::parse("{input}").unwrap_err().contains("unknown placeholder '{input}'"));
        assert!(Template::parse("{steps..output}").unwrap_err().contains("unknown placeholder"));
        assert!(Template::parse("a } b").unwrap_err().contains("unmatched '}'"));
        assert!(Template::parse("a { b").unwrap_err().contains("unmatched"));
    }
}
