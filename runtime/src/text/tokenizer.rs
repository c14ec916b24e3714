//! CLIP tokenizer: the `tokenizers` crate running a bundle's `tokenizer.json` (OpenAI's BPE merges,
//! lower-casing and whitespace clean-up as OpenAI's), then OpenAI's framing: `<|startoftext|>` ...
//! `<|endoftext|>`, truncated to the context length with the end token kept, padded with 0.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const CONTEXT_LENGTH: usize = 77;
pub const START_TOKEN: &str = "<|startoftext|>";
pub const END_TOKEN: &str = "<|endoftext|>";

/// How far a batch of token ids is padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Always the full context length (77), as OpenAI's `clip.tokenize`.
    Context,
    /// The longest sequence of the batch: graphs with a dynamic sequence axis run much faster so.
    Longest,
}

/// A batch of token ids, row-major `[batch, len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub ids: Vec<i64>,
    pub batch: usize,
    pub len: usize,
}

impl TokenBatch {
    pub fn row(&self, i: usize) -> &[i64] {
        &self.ids[i * self.len..(i + 1) * self.len]
    }
}

pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    start_id: u32,
    end_id: u32,
    source: PathBuf,
}

impl ClipTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }

    pub fn from_bytes(bytes: &[u8], name: &Path) -> Result<Self> {
        let err = |reason: String| Error::Tokenizer {
            path: name.to_path_buf(),
            reason,
        };
        let library = |cause: tokenizers::Error| Error::TokenizerLibrary {
            path: name.to_path_buf(),
            text: None,
            cause,
        };
        let mut inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(library)?;
        // Framing, truncation and padding are done here, the same for every tokenizer.json.
        inner.with_padding(None);
        inner.with_truncation(None).map_err(library)?;
        let id = |tok: &str| {
            inner
                .token_to_id(tok)
                .ok_or_else(|| err(format!("vocabulary has no {tok}")))
        };
        let (start_id, end_id) = (id(START_TOKEN)?, id(END_TOKEN)?);
        Ok(ClipTokenizer {
            inner,
            start_id,
            end_id,
            source: name.to_path_buf(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids of one text: start, BPE tokens, end; at most `CONTEXT_LENGTH`, the end token kept.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let text = clean_text(text);
        let enc =
            self.inner
                .encode(text.as_str(), false)
                .map_err(|cause| Error::TokenizerLibrary {
                    path: self.source.clone(),
                    text: Some(text.clone()),
                    cause,
                })?;
        let mut ids = Vec::with_capacity(CONTEXT_LENGTH);
        ids.push(self.start_id as i64);
        ids.extend(enc.get_ids().iter().map(|&t| t as i64));
        ids.truncate(CONTEXT_LENGTH - 1);
        ids.push(self.end_id as i64);
        Ok(ids)
    }

    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S], padding: Padding) -> Result<TokenBatch> {
        let rows: Vec<Vec<i64>> = texts
            .iter()
            .map(|t| self.encode(t.as_ref()))
            .collect::<Result<_>>()?;
        let len = match padding {
            Padding::Context => CONTEXT_LENGTH,
            Padding::Longest => rows.iter().map(Vec::len).max().unwrap_or(2),
        };
        let mut ids = vec![0i64; rows.len() * len];
        for (i, r) in rows.iter().enumerate() {
            ids[i * len..i * len + r.len()].copy_from_slice(r);
        }
        Ok(TokenBatch {
            ids,
            batch: rows.len(),
            len,
        })
    }
}

/// OpenAI's `basic_clean` before BPE: the cheap fixes of `ftfy.fix_text` (curly quotes, Latin
/// ligatures, full-width forms, control characters) and HTML entities (`html.unescape`, twice).
/// Lower-casing, NFC and whitespace collapsing are in `tokenizer.json`'s normaliser.
/// Not reproduced: ftfy's mojibake repair and the rarer HTML5 named entities.
pub fn clean_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{02bc}' | '\u{2018}'..='\u{201b}' => out.push('\''),
            '\u{201c}'..='\u{201f}' => out.push('"'),
            '\u{3000}' => out.push(' '),
            '\u{0}'..='\u{8}'
            | '\u{b}'
            | '\u{e}'..='\u{1f}'
            | '\u{7f}'
            | '\u{206a}'..='\u{206f}'
            | '\u{fff9}'..='\u{fffc}'
            | '\u{feff}' => {}
            '\u{ff01}'..='\u{ffef}' => out.extend(
                unicode_normalization::UnicodeNormalization::nfkc(std::iter::once(c)),
            ),
            _ => match ligature(c) {
                Some(s) => out.push_str(s),
                None => out.push(c),
            },
        }
    }
    let once = unescape_html(&out);
    unescape_html(&once).trim().to_string()
}

fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// `&amp;`-style named entities (the common ones) and numeric `&#NN;` / `&#xHH;` references.
fn unescape_html(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        let end = rest.find(';').filter(|&e| e <= 12);
        let decoded = end.and_then(|e| {
            let body = &rest[1..e];
            let c = if let Some(num) = body.strip_prefix("#x").or_else(|| body.strip_prefix("#X")) {
                u32::from_str_radix(num, 16).ok().and_then(char::from_u32)
            } else if let Some(num) = body.strip_prefix('#') {
                num.parse::<u32>().ok().and_then(char::from_u32)
            } else {
                match body {
                    "amp" => Some('&'),
                    "lt" => Some('<'),
                    "gt" => Some('>'),
                    "quot" => Some('"'),
                    "apos" => Some('\''),
                    "nbsp" => Some('\u{a0}'),
                    _ => None,
                }
            };
            c.map(|c| (c, e + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_follows_ftfy_and_html_unescape() {
        assert_eq!(
            clean_text("\u{201c}curly\u{201d} \u{2018}q\u{2019}"),
            "\"curly\" 'q'"
        );
        assert_eq!(clean_text("\u{fb01}ne \u{ff21}\u{ff11}"), "fine A1");
        assert_eq!(
            clean_text("a &amp;amp; b &#65;&#x42; &bogus; &"),
            "a & b AB &bogus; &"
        );
        assert_eq!(clean_text("  x\u{0}y\u{feff} "), "xy");
    }
}
