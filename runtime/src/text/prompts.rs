//! Prompts: templates x labels -> texts for the text encoder. The encoder's outputs become one
//! embedding per label in [`crate::scoring::ensemble`].

use super::labels::Label;
use crate::error::{Error, Result};

/// The five zero-shot templates of the reference experiment, in its order (`{}` = label).
pub const REFERENCE_TEMPLATES: [&str; 5] = [
    "a X-Ray image of {} part",
    "This is a X-ray image of {} part.",
    "a X-ray of a {}",
    "a X-ray image of {} of human",
    "a image of {}",
];

/// The template used when none is given: the reference experiment's first.
pub const DEFAULT_TEMPLATE: &str = REFERENCE_TEMPLATES[0];

/// `[DEFAULT_TEMPLATE]`, as an owned list for options that take several.
pub fn default_templates() -> Vec<String> {
    vec![DEFAULT_TEMPLATE.to_string()]
}

/// Fills a template: every `{}` becomes the label's prompt name.
pub fn fill(template: &str, label: &Label) -> Result<String> {
    if !template.contains("{}") {
        return Err(Error::Labels(format!(
            "template {template:?} has no {{}} placeholder"
        )));
    }
    Ok(template.replace("{}", &label.prompt_name))
}

/// Every template filled with every label, template-major: `[templates][labels]`.
pub fn prompts(templates: &[String], labels: &[Label]) -> Result<Vec<String>> {
    if templates.is_empty() {
        return Err(Error::Labels("no prompt template given".into()));
    }
    templates
        .iter()
        .flat_map(|t| labels.iter().map(move |l| fill(t, l)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_and_prompts() {
        let l = Label::new("3", "Chest");
        assert_eq!(fill("a X-ray of a {}", &l).unwrap(), "a X-ray of a chest");
        assert!(fill("no placeholder", &l).is_err());
        let hand = Label::new("h", "Hand");
        let texts = prompts(&["{}".into(), "a {}".into()], &[l, hand]).unwrap();
        assert_eq!(texts, ["chest", "hand", "a chest", "a hand"]);
        assert!(prompts(&[], &[]).is_err());
    }
}
