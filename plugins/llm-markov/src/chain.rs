//! Word-level Markov text generation, free of host calls: the tokenizer, an order-2 chain over
//! interned tokens that backs off to order 1, the temperature sampler, and a generator that
//! detokenizes as it goes (spacing, attached punctuation, capitalised sentence starts).
//!
//! A token is a word (letters and digits, joined by single apostrophes or hyphens) or one of the
//! punctuation marks `. , ; : ! ?`; quotes, brackets and dashes are dropped. The corpus is read as
//! a circle (its last token is followed by its first), so every token and every pair seen in it
//! has a successor and generation never dead-ends.

use genpipe_plugin_sdk::{SplitMix64, hash_text};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, DefaultHasher};

const PUNCTUATION: &[char] = &['.', ',', ';', ':', '!', '?'];
const SENTENCE_ENDS: &[char] = &['.', '!', '?'];
/// Temperatures at or below this pick the most frequent successor.
const GREEDY_BELOW: f32 = 0.01;

/// Splits `text` into tokens, as slices of `text` in their original case.
pub fn tokenize(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        let start = rest.find(|c: char| c.is_alphanumeric() || PUNCTUATION.contains(&c))?;
        rest = &rest[start..];
        let first = rest.chars().next()?;
        let len = if PUNCTUATION.contains(&first) { 1 } else { word_len(rest) };
        let (token, tail) = rest.split_at(len);
        rest = tail;
        Some(token)
    })
}

/// The number of words (tokens other than punctuation) in `text`.
pub fn count_words(text: &str) -> usize {
    tokenize(text).filter(|t| !is_punctuation(t)).count()
}

/// The length in bytes of the word that starts `s` (which starts with an alphanumeric).
fn word_len(s: &str) -> usize {
    let mut end = 0;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c.is_alphanumeric() {
            end = i + c.len_utf8();
        } else if !(matches!(c, '\'' | '’' | '-') && chars.peek().is_some_and(|(_, n)| n.is_alphanumeric())) {
            break;
        }
    }
    end
}

fn is_punctuation(token: &str) -> bool {
    token.starts_with(PUNCTUATION)
}

/// The interning key of a token: lower-cased, with typographic apostrophes made plain.
fn key(token: &str) -> String {
    token.to_lowercase().replace('’', "'")
}

/// One possible next token and how often it followed the context in the corpus.
#[derive(Debug, Clone, Copy)]
struct Successor {
    next: u32,
    count: u32,
}

/// The chain: tokens interned as `u32` ids, successor lists stored flat, sorted by id.
#[derive(Debug)]
pub struct Chain {
    /// Keyed with a fixed hasher: std's random one would import `wasi:random` for nothing.
    ids: HashMap<String, u32, BuildHasherDefault<DefaultHasher>>,
    /// How each token is written mid-sentence ("Alice", "I", "the", ",").
    display: Vec<Box<str>>,
    /// `succ1[off1[t]..off1[t + 1]]` follow token `t`.
    off1: Vec<u32>,
    succ1: Vec<Successor>,
    /// `succ2[off2[i]..off2[i + 1]]` follow the pair whose key is `pairs[i]`.
    pairs: Vec<u64>,
    off2: Vec<u32>,
    succ2: Vec<Successor>,
    /// The corpus's last token, whose successors (it ends a sentence) are sentence starts.
    last: u32,
}

fn pair_key(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

impl Chain {
    /// Builds the chain from `corpus`, which must contain at least one word.
    pub fn build(corpus: &str) -> Self {
        let mut ids = HashMap::default();
        let mut forms: Vec<&str> = Vec::new();
        // Per token: mid-sentence capitalised uses minus lower-case uses.
        let mut capital_votes: Vec<i32> = Vec::new();
        let mut seq = Vec::new();
        let mut sentence_start = true;
        let mut after_punctuation = false;
        for token in tokenize(corpus) {
            let punctuation = is_punctuation(token);
            if punctuation && after_punctuation {
                continue; // keep the first of `?',` and the like
            }
            let id = *ids.entry(key(token)).or_insert_with(|| {
                forms.push(token);
                capital_votes.push(0);
                forms.len() as u32 - 1
            });
            if !punctuation && !sentence_start {
                let mut chars = token.chars();
                let capitalised = chars.next().is_some_and(char::is_uppercase) && !chars.any(char::is_uppercase);
                let lower = !token.chars().any(char::is_uppercase);
                capital_votes[id as usize] += i32::from(capitalised) - i32::from(lower);
            }
            sentence_start = token.starts_with(SENTENCE_ENDS) || (sentence_start && punctuation);
            after_punctuation = punctuation;
            seq.push(id);
        }
        let display = forms
            .iter()
            .zip(&capital_votes)
            .map(|(form, &votes)| if votes > 0 { capitalise(&key(form)) } else { key(form) }.into_boxed_str())
            .collect();

        let n = seq.len();
        let at = |i: usize| seq[i % n];
        let mut bigrams: Vec<(u32, u32)> = (0..n).map(|i| (at(i), at(i + 1))).collect();
        bigrams.sort_unstable();
        let (mut off1, mut succ1) = (vec![0], Vec::new());
        for group in bigrams.chunk_by(|x, y| x.0 == y.0) {
            succ1.extend(group.chunk_by(|x, y| x == y).map(|run| Successor { next: run[0].1, count: run.len() as u32 }));
            off1.push(succ1.len() as u32);
        }
        let mut trigrams: Vec<(u32, u32, u32)> = (0..n).map(|i| (at(i), at(i + 1), at(i + 2))).collect();
        trigrams.sort_unstable();
        let (mut pairs, mut off2, mut succ2) = (Vec::new(), vec![0], Vec::new());
        for group in trigrams.chunk_by(|x, y| (x.0, x.1) == (y.0, y.1)) {
            pairs.push(pair_key(group[0].0, group[0].1));
            succ2.extend(group.chunk_by(|x, y| x == y).map(|run| Successor { next: run[0].2, count: run.len() as u32 }));
            off2.push(succ2.len() as u32);
        }
        Self { ids, display, off1, succ1, pairs, off2, succ2, last: seq[n - 1] }
    }

    /// The id of `token`, if the corpus has it.
    pub fn id(&self, token: &str) -> Option<u32> {
        self.ids.get(&key(token)).copied()
    }

    /// What may follow `cur` (preceded by `prev`): the pair's successors, or `cur`'s own when
    /// the pair never occurred.
    fn successors(&self, prev: Option<u32>, cur: u32) -> &[Successor] {
        let pair = prev.and_then(|p| self.pairs.binary_search(&pair_key(p, cur)).ok());
        let (off, succ, i) = match pair {
            Some(i) => (&self.off2, &self.succ2, i),
            None => (&self.off1, &self.succ1, cur as usize),
        };
        &succ[off[i] as usize..off[i + 1] as usize]
    }

    /// The context to continue `prompt` from: its last token the corpus knows (with the token
    /// before it when the corpus has that pair), or the end of a corpus sentence.
    fn start(&self, prompt: &str) -> (Option<u32>, u32) {
        let known: Vec<Option<u32>> = tokenize(prompt).map(|t| self.id(t)).collect();
        let Some((i, cur)) = known.iter().enumerate().rev().find_map(|(i, id)| id.map(|id| (i, id))) else {
            return (None, self.last);
        };
        let prev = i.checked_sub(1).and_then(|p| known[p]);
        (prev.filter(|&p| self.pairs.binary_search(&pair_key(p, cur)).is_ok()), cur)
    }

    fn ends_sentence(&self, id: u32) -> bool {
        self.display[id as usize].starts_with(SENTENCE_ENDS)
    }
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map_or_else(String::new, |first| first.to_uppercase().chain(chars).collect())
}

/// Picks a successor with probability proportional to `count^(1 / temperature)`, or the most
/// frequent one (the lowest id among equals) when `temperature` is at most 0.01.
fn sample(successors: &[Successor], temperature: f32, rng: &mut SplitMix64) -> u32 {
    let max = successors.iter().map(|s| s.count).max().unwrap_or(1);
    if temperature <= GREEDY_BELOW {
        return successors.iter().find(|s| s.count == max).map_or(0, |s| s.next);
    }
    // Scaled by the largest count so that high exponents cannot overflow.
    let exponent = 1.0 / f64::from(temperature);
    let weight = |s: &Successor| (f64::from(s.count) / f64::from(max)).powf(exponent);
    let mut target = rng.next_f64() * successors.iter().map(weight).sum::<f64>();
    for s in successors {
        target -= weight(s);
        if target < 0.0 {
            return s.next;
        }
    }
    successors.last().map_or(0, |s| s.next)
}

/// Generates a continuation of a prompt one token at a time.
pub struct Generator<'c> {
    chain: &'c Chain,
    rng: SplitMix64,
    temperature: f32,
    prev: Option<u32>,
    cur: u32,
    /// Nothing was generated yet: no leading space, and no leading punctuation.
    at_start: bool,
}

impl<'c> Generator<'c> {
    /// Seeds the generator with `seed ^ hash_text(prompt)`; `temperature` is clamped to `[0, 5]`
    /// (NaN counts as 1).
    pub fn new(chain: &'c Chain, prompt: &str, seed: u64, temperature: f32) -> Self {
        let (prev, cur) = chain.start(prompt);
        let temperature = if temperature.is_nan() { 1.0 } else { temperature.clamp(0.0, 5.0) };
        let rng = SplitMix64::new(seed ^ hash_text(prompt));
        Self { chain, rng, temperature, prev, cur, at_start: true }
    }

    /// The next token as text to append: a punctuation mark, or a word with a leading space
    /// (none for the first) and a capital at the start of a sentence.
    pub fn next_piece(&mut self) -> String {
        loop {
            let next = sample(self.chain.successors(self.prev, self.cur), self.temperature, &mut self.rng);
            let sentence_start = self.chain.ends_sentence(self.cur);
            (self.prev, self.cur) = (Some(self.cur), next);
            let form = &self.chain.display[next as usize];
            if is_punctuation(form) {
                if self.at_start {
                    continue;
                }
                return form.to_string();
            }
            let space = if self.at_start { "" } else { " " };
            self.at_start = false;
            return if sentence_start { format!("{space}{}", capitalise(form)) } else { format!("{space}{form}") };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn chain() -> &'static Chain {
        static CHAIN: OnceLock<Chain> = OnceLock::new();
        CHAIN.get_or_init(|| Chain::build(crate::CORPUS))
    }

    fn generate(prompt: &str, seed: u64, temperature: f32, tokens: usize) -> String {
        let mut generator = Generator::new(chain(), prompt, seed, temperature);
        (0..tokens).map(|_| generator.next_piece()).collect()
    }

    #[test]
    fn tokenizes_words_and_punctuation() {
        let tokens: Vec<_> = tokenize("`Oh dear!' said Alice, `don't--think' of it’s rabbit-hole").collect();
        assert_eq!(tokens, ["Oh", "dear", "!", "said", "Alice", ",", "don't", "think", "of", "it’s", "rabbit-hole"]);
        assert_eq!(count_words("Alice went down the rabbit hole."), 6);
    }

    #[test]
    fn builds_quickly_and_compactly() {
        let started = std::time::Instant::now();
        let chain = Chain::build(crate::CORPUS);
        assert!(started.elapsed().as_millis() < 500, "debug build took {:?}", started.elapsed());
        assert_eq!(chain.display[chain.id("alice").unwrap() as usize].as_ref(), "Alice");
        assert_eq!(chain.display[chain.id("The").unwrap() as usize].as_ref(), "the");
        assert_eq!(chain.display[chain.id("i'm").unwrap() as usize].as_ref(), "I'm");
    }

    #[test]
    fn same_seed_same_text_and_different_seed_different_text() {
        let text = generate("Alice went down the rabbit hole", 7, 1.0, 60);
        assert_eq!(text, generate("Alice went down the rabbit hole", 7, 1.0, 60));
        assert_ne!(text, generate("Alice went down the rabbit hole", 8, 1.0, 60));
    }

    #[test]
    fn greedy_ignores_the_seed() {
        assert_eq!(generate("the White Rabbit", 1, 0.0, 40), generate("the White Rabbit", 2, 0.005, 40));
    }

    #[test]
    fn emits_exactly_the_requested_tokens_all_from_the_corpus() {
        for (seed, tokens) in [(1, 1), (2, 7), (3, 100), (4, 333)] {
            let text = generate("A mouse in the pool!", seed, 1.3, tokens);
            assert_eq!(tokenize(&text).count(), tokens, "{text}");
            assert!(tokenize(&text).all(|t| chain().id(t).is_some()), "{text}");
            assert!(!text.starts_with([' ', ',', '.']), "{text}");
        }
    }

    #[test]
    fn capitalises_sentence_starts() {
        let text = generate("", 5, 1.0, 300);
        assert!(text.starts_with(char::is_uppercase), "{text}");
        for sentence in text.split_inclusive(SENTENCE_ENDS).skip(1) {
            assert!(sentence.trim_start().starts_with(char::is_uppercase), "{sentence:?} in {text}");
        }
    }

    #[test]
    fn continues_from_the_last_known_prompt_word() {
        let c = chain();
        let (prev, cur) = c.start("Alice went down the rabbit hole");
        assert_eq!((prev, cur), (c.id("the"), c.id("rabbit").unwrap()));
        assert_eq!(c.start("zzz qqq"), (None, c.last));
        let text = generate("Alice went down the rabbit hole", 7, 1.0, 60);
        println!("prompt \"Alice went down the rabbit hole\", seed 7, 60 tokens:\n{text}");
    }
}
