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
        let err = |reason: String| Error::Tokenizer { path: name.to_path_buf(), reason };
        let mut inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| err(e.to_string()))?;
        // Framing, truncation and padding are done here, the same for every tokenizer.json.
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| err(e.to_string()))?;
        let id = |tok: &str| inner.token_to_id(tok).ok_or_else(|| err(format!("vocabulary has no {tok}")));
        let (start_id, end_id) = (id(START_TOKEN)?, id(END_TOKEN)?);
        Ok(ClipTokenizer { inner, start_id, end_id, source: name.to_path_buf() })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids of one text: start, BPE tokens, end; at most `CONTEXT_LENGTH`, the end token kept.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer { path: self.source.clone(), reason: format!("{text:?}: {e}") })?;
        let mut ids = Vec::with_capacity(CONTEXT_LENGTH);
        ids.push(self.start_id as i64);
        ids.extend(enc.get_ids().iter().map(|&t| t as i64));
        ids.truncate(CONTEXT_LENGTH - 1);
        ids.push(self.end_id as i64);
        Ok(ids)
    }

    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S], padding: Padding) -> Result<TokenBatch> {
        let rows: Vec<Vec<i64>> = texts.iter().map(|t| self.encode(t.as_ref())).collect::<Result<_>>()?;
        let len = match padding {
            Padding::Context => CONTEXT_LENGTH,
            Padding::Longest => rows.iter().map(Vec::len).max().unwrap_or(2),
        };
        let mut ids = vec![0i64; rows.len() * len];
        for (i, r) in rows.iter().enumerate() {
            ids[i * len..i * len + r.len()].copy_from_slice(r);
        }
        Ok(TokenBatch { ids, batch: rows.len(), len })
    }
}
