//! Finding image files (no ONNX Runtime needed: shared with the data sets and the browser build).
//!
//! Folders are searched recursively and by content: PACS exports name DICOM files without an
//! extension, so a file with an unknown extension is kept when its first bytes say PNG, JPEG or
//! DICOM. Hidden files and folders (`.git`, `.ipynb_checkpoints`) are skipped.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// File extensions taken without looking inside.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "dcm", "dicom"];

/// What a folder search looks for, for messages.
pub const SEARCHED: &str =
    "PNG, JPEG or DICOM files, recognised by content, in folders searched recursively (hidden ones skipped)";

/// Image files of the inputs: folders expanded (recursively, sorted), files given by name kept as
/// they are. An input that cannot be read is returned as an error beside the files of the others.
pub fn collect_files(inputs: &[PathBuf]) -> (Vec<PathBuf>, Vec<Error>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for input in inputs {
        match std::fs::metadata(input) {
            Err(e) => problems.push(Error::io(input, e)),
            Ok(meta) if meta.is_dir() => {
                if let Err(e) = walk(input, &mut out) {
                    problems.push(e);
                }
            }
            Ok(_) => out.push(input.clone()),
        }
    }
    (out, problems)
}

/// `.git`, `.ipynb_checkpoints`, ...: never images, never labels.
pub(crate) fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Whether a file found in a folder is an image: by extension, else by its first bytes.
fn looks_like_image(p: &Path) -> bool {
    if p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
    {
        return true;
    }
    let mut head = Vec::with_capacity(132);
    std::fs::File::open(p)
        .and_then(|f| f.take(132).read_to_end(&mut head))
        .is_ok()
        && crate::image::decode::sniff(&head).is_some()
}

pub(crate) fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| !is_hidden(p))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.is_file() && looks_like_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Image files under a folder, recursively, sorted.
pub fn collect_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(dir, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_searched_by_content_and_hidden_ones_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let mut dcm = vec![0u8; 128];
        dcm.extend_from_slice(b"DICM");
        std::fs::write(d.join("IM000001"), &dcm).unwrap(); // PACS export: no extension
        std::fs::write(d.join("notes"), "text").unwrap();
        std::fs::write(d.join("scan.PNG"), "whatever").unwrap();
        std::fs::create_dir(d.join(".ipynb_checkpoints")).unwrap();
        std::fs::write(d.join(".ipynb_checkpoints/x.png"), "x").unwrap();
        let found = collect_images(d).unwrap();
        assert_eq!(found, vec![d.join("IM000001"), d.join("scan.PNG")]);
        let (files, problems) = collect_files(&[d.join("missing.png"), d.to_path_buf()]);
        assert_eq!(files.len(), 2);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].to_string().contains("missing.png"));
    }
}
