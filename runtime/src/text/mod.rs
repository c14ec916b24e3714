//! Text side: OpenAI's CLIP tokenizer, label sets and prompt templates.

pub mod labels;
pub mod prompts;
pub mod tokenizer;
