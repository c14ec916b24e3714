//! Text side: OpenAI's CLIP tokenizer, label sets and prompt templates, and the DICOM body-part
//! terms labels stand for.

pub mod body_part;
pub mod labels;
pub mod prompts;
pub mod tokenizer;
