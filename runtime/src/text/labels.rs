//! Label sets and prompt templates of the reference experiment, defined once for every crate.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One class of a label set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    /// Stable identifier (the data set's own: UNIFESP index, IRMA category number, folder name).
    pub id: String,
    /// What people read.
    pub name: String,
    /// The words put into prompt templates.
    pub prompt_name: String,
}

impl Label {
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Label {
        let name = name.into();
        Label {
            id: id.into(),
            prompt_name: name.to_lowercase(),
            name,
        }
    }
}

/// UNIFESP body parts, indices 0..21 as in the competition's `train.csv`.
pub const UNIFESP_NAMES: [&str; 22] = [
    "Abdomen",
    "Ankle",
    "Cervical Spine",
    "Chest",
    "Clavicles",
    "Elbow",
    "Feet",
    "Finger",
    "Forearm",
    "Hand",
    "Hip",
    "Knee",
    "Lower Leg",
    "Lumbar Spine",
    "Others",
    "Pelvis",
    "Shoulder",
    "Sinus",
    "Skull",
    "Thigh",
    "Thoracic Spine",
    "Wrist",
];

/// The 15 IRMA categories of the reference experiment (1-9: first digit of the anatomical code,
/// 10-15: second-level chest codes).
pub const IRMA15_NAMES: [&str; 15] = [
    "whole body",
    "cranium",
    "spine",
    "upper extremity/arm",
    "chest",
    "breast",
    "abdomen",
    "pelvis",
    "lower extremity",
    "chest/bones",
    "chest/lung",
    "chest/hilum",
    "chest/mediastinum",
    "chest/heart",
    "chest/diaphragm",
];

pub fn unifesp() -> Vec<Label> {
    UNIFESP_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| Label::new(i.to_string(), *n))
        .collect()
}

pub fn irma15() -> Vec<Label> {
    IRMA15_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut l = Label::new((i + 1).to_string(), *n);
            // In a prompt the slash goes: "upper extremity/arm" becomes "upper extremity arm".
            l.prompt_name = n.replace('/', " ");
            l
        })
        .collect()
}

/// Labels from user text: a comma-separated list, or lines of a file (`#` comments, blanks ignored).
pub fn from_list<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Vec<Label>> {
    let labels: Vec<Label> = names
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty() && !s.starts_with('#'))
        .map(|s| Label::new(s, s))
        .collect();
    if labels.is_empty() {
        return Err(Error::Labels("the label list is empty".into()));
    }
    let mut seen = std::collections::HashSet::new();
    for l in &labels {
        if !seen.insert(l.name.to_lowercase()) {
            return Err(Error::Labels(format!("label {:?} appears twice", l.name)));
        }
    }
    Ok(labels)
}

/// The same 15 IRMA categories as the reference experiment's code wrote its prompts: the category
/// text as it is (`a X-Ray image of upper extremity/arm part`).
pub fn irma_reference() -> Vec<Label> {
    IRMA15_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| Label {
            id: (i + 1).to_string(),
            name: n.to_string(),
            prompt_name: n.to_string(),
        })
        .collect()
}

/// Names of the built-in label sets, for help and error texts.
pub const BUILTIN_SETS: &str = "unifesp, irma, irma-reference";

/// A named built-in set (`unifesp`, `irma`, `irma-reference`), else `None`.
pub fn builtin(name: &str) -> Option<Vec<Label>> {
    match name {
        "unifesp" => Some(unifesp()),
        "irma" | "irma15" => Some(irma15()),
        "irma-reference" => Some(irma_reference()),
        _ => None,
    }
}

/// The one reading of a `--labels` value in every command: a built-in set name, else a file
/// (one label per line, `#` comments) when such a file exists, else a comma-separated list.
pub fn parse_spec(spec: &str) -> Result<Vec<Label>> {
    if let Some(set) = builtin(spec.trim()) {
        return Ok(set);
    }
    let path = std::path::Path::new(spec);
    if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        return from_list(text.lines());
    }
    if !spec.contains(',')
        && (spec.ends_with(".txt") || spec.ends_with(".csv") || spec.contains('/'))
    {
        return Err(Error::Labels(format!(
            "--labels {spec:?}: no such file (a label list is comma-separated; built-in sets: {BUILTIN_SETS})"
        )));
    }
    from_list(spec.split(','))
}

/// Where each wanted label sits in `have`: the same id and name, else the same name (case
/// ignored). `None` if any is missing.
pub fn match_labels(have: &[&Label], wanted: &[Label]) -> Option<Vec<usize>> {
    wanted
        .iter()
        .map(|w| {
            have.iter()
                .position(|h| h.id == w.id && h.name.eq_ignore_ascii_case(&w.name))
                .or_else(|| {
                    have.iter()
                        .position(|h| h.name.eq_ignore_ascii_case(&w.name))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_sets_have_reference_sizes_and_order() {
        let u = unifesp();
        assert_eq!(u.len(), 22);
        assert_eq!((u[3].id.as_str(), u[3].name.as_str()), ("3", "Chest"));
        assert_eq!(u[21].name, "Wrist");
        let i = irma15();
        assert_eq!(i.len(), 15);
        assert_eq!(
            (i[0].id.as_str(), i[14].name.as_str()),
            ("1", "chest/diaphragm")
        );
    }

    #[test]
    fn list_errors() {
        assert!(from_list(["a", " ", "A"]).is_err());
        assert!(from_list([" ", "# x"]).is_err());
        assert_eq!(from_list(["chest x-ray", "hand x-ray"]).unwrap().len(), 2);
    }
}
