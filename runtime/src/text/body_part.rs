//! Labels -> DICOM `BodyPartExamined` (0018,0015) terms, so a prediction can be checked against the
//! tag a modality wrote. Terms are the defined terms of DICOM PS3.16 Annex L ("Correspondence of
//! Anatomic Region Codes and Body Part Examined Defined Terms"): upper case, no spaces.

use super::labels::Label;

/// Label words (lower case, modality words removed) -> the Annex L term.
const TERMS: &[(&str, &str)] = &[
    // UNIFESP's 22 classes ("Others" and "Sinus" have none: Annex L gives no term for the
    // paranasal sinuses).
    ("abdomen", "ABDOMEN"),
    ("ankle", "ANKLE"),
    ("cervical spine", "CSPINE"),
    ("chest", "CHEST"),
    ("clavicles", "CLAVICLE"),
    ("clavicle", "CLAVICLE"),
    ("elbow", "ELBOW"),
    ("feet", "FOOT"),
    ("foot", "FOOT"),
    ("finger", "FINGER"),
    ("fingers", "FINGER"),
    ("forearm", "FOREARM"),
    ("hand", "HAND"),
    ("hip", "HIP"),
    ("knee", "KNEE"),
    ("lower leg", "LOWERLEG"),
    ("lumbar spine", "LSPINE"),
    ("pelvis", "PELVIS"),
    ("shoulder", "SHOULDER"),
    ("skull", "SKULL"),
    ("thigh", "THIGH"),
    ("thoracic spine", "TSPINE"),
    ("wrist", "WRIST"),
    // The demonstration bundle (MedNIST) and the IRMA categories.
    ("head", "HEAD"),
    ("breast", "BREAST"),
    ("cranium", "SKULL"),
    ("spine", "SPINE"),
    ("whole body", "WHOLEBODY"),
    ("upper extremity/arm", "UPPERLIMB"),
    ("lower extremity", "LOWERLIMB"),
    ("chest/bones", "CHEST"),
    ("chest/lung", "CHEST"),
    ("chest/hilum", "CHEST"),
    ("chest/mediastinum", "CHEST"),
    ("chest/heart", "CHEST"),
    ("chest/diaphragm", "CHEST"),
];

/// Words that name the modality, not the body part ("chest X-ray", "head CT").
const MODALITY_WORDS: &[&str] = &["x-ray", "xray", "radiograph", "ct", "mri", "mr", "image"];

/// The `BodyPartExamined` term a label implies, if any.
pub fn term_for(label: &Label) -> Option<&'static str> {
    let name = label.name.to_lowercase();
    let words: Vec<&str> = name
        .split_whitespace()
        .filter(|w| !MODALITY_WORDS.contains(w))
        .collect();
    let key = words.join(" ");
    TERMS.iter().find(|(k, _)| *k == key).map(|(_, t)| *t)
}

/// Broader terms a modality may write for a region this model names more precisely; a tag with
/// one of them agrees with every term listed after it.
const BROADER: &[(&str, &[&str])] = &[
    ("THORAX", &["CHEST"]),
    ("LEG", &["LOWERLEG"]),
    (
        "SPINE",
        &[
            "CSPINE", "TSPINE", "LSPINE", "SSPINE", "CTSPINE", "TLSPINE", "LSSPINE",
        ],
    ),
    (
        "EXTREMITY",
        &[
            "UPPERLIMB",
            "LOWERLIMB",
            "ARM",
            "UPPERARM",
            "FOREARM",
            "ELBOW",
            "WRIST",
            "HAND",
            "FINGER",
            "SHOULDER",
            "LEG",
            "LOWERLEG",
            "THIGH",
            "KNEE",
            "ANKLE",
            "FOOT",
            "HIP",
        ],
    ),
    (
        "UPPERLIMB",
        &[
            "ARM", "UPPERARM", "FOREARM", "ELBOW", "WRIST", "HAND", "FINGER", "SHOULDER",
        ],
    ),
    (
        "LOWERLIMB",
        &["LEG", "LOWERLEG", "THIGH", "KNEE", "ANKLE", "FOOT", "HIP"],
    ),
    ("HEAD", &["SKULL"]),
    ("SKULL", &["HEAD"]),
];

/// Whether the instance's `BodyPartExamined` value agrees with the predicted term: the same term
/// (case and surrounding blanks ignored), or a broader region that contains it (`EXTREMITY` for
/// `HAND`, `SPINE` for `LSPINE`).
pub fn agrees(examined: &str, predicted: &str) -> bool {
    let examined = examined.trim().to_uppercase();
    examined == predicted
        || BROADER
            .iter()
            .any(|(broad, narrower)| *broad == examined && narrower.contains(&predicted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::labels;

    #[test]
    fn every_unifesp_body_part_has_its_annex_l_term() {
        let terms: Vec<Option<&str>> = labels::unifesp().iter().map(term_for).collect();
        assert_eq!(
            terms,
            [
                Some("ABDOMEN"),
                Some("ANKLE"),
                Some("CSPINE"),
                Some("CHEST"),
                Some("CLAVICLE"),
                Some("ELBOW"),
                Some("FOOT"),
                Some("FINGER"),
                Some("FOREARM"),
                Some("HAND"),
                Some("HIP"),
                Some("KNEE"),
                Some("LOWERLEG"),
                Some("LSPINE"),
                None, // Others
                Some("PELVIS"),
                Some("SHOULDER"),
                None, // Sinus
                Some("SKULL"),
                Some("THIGH"),
                Some("TSPINE"),
                Some("WRIST"),
            ]
        );
    }

    #[test]
    fn modality_words_do_not_hide_the_body_part() {
        for (name, term) in [
            ("chest X-ray", Some("CHEST")),
            ("hand X-ray", Some("HAND")),
            ("head CT", Some("HEAD")),
            ("breast MRI", Some("BREAST")),
            ("abdomen CT", Some("ABDOMEN")),
            ("a cat", None),
        ] {
            assert_eq!(term_for(&Label::new(name, name)), term, "{name}");
        }
        for l in labels::irma15() {
            assert!(term_for(&l).is_some(), "{}", l.name);
        }
    }

    #[test]
    fn broader_tags_agree_and_different_parts_do_not() {
        assert!(agrees("CHEST", "CHEST"));
        assert!(agrees(" chest ", "CHEST"));
        assert!(agrees("EXTREMITY", "HAND"));
        assert!(agrees("SPINE", "LSPINE"));
        assert!(agrees("THORAX", "CHEST"));
        assert!(!agrees("CHEST", "HAND"));
        assert!(!agrees("HAND", "EXTREMITY"));
        assert!(!agrees("LSPINE", "CSPINE"));
        assert!(!agrees("", "CHEST"));
    }
}
