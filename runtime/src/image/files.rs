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

/// One entry of a listing: an image file, or an input that could not be listed (and why).
pub type Listed = std::result::Result<PathBuf, Box<(PathBuf, Error)>>;

/// Image files of the inputs, lazily and in order: folders expanded (recursively, sorted by name
/// within each folder, symbolic links followed, loops reported), files given by name kept as they
/// are. Memory does not grow with the number of files listed.
pub fn list(inputs: impl IntoIterator<Item = PathBuf>) -> impl Iterator<Item = Listed> {
    inputs
        .into_iter()
        .flat_map(|input| -> Box<dyn Iterator<Item = Listed>> {
            match std::fs::metadata(&input) {
                Err(e) => Box::new(std::iter::once(Err(Box::new((
                    input.clone(),
                    Error::io(&input, e),
                ))))),
                Ok(meta) if meta.is_dir() => Box::new(walk(&input)),
                Ok(_) => Box::new(std::iter::once(Ok(input))),
            }
        })
}

/// Image files of the paths listed in `reader`, one per line (`--files-from`; empty lines skipped,
/// a folder expanded as in [`list`]), read as they are needed. A read error ends the listing with
/// an error naming `source`.
pub fn list_lines(reader: impl std::io::BufRead, source: PathBuf) -> impl Iterator<Item = Listed> {
    let mut failed = false;
    reader
        .split(b'\n')
        .map_while(move |line| {
            if failed {
                return None;
            }
            failed = line.is_err();
            Some(line)
        })
        .flat_map(move |line| -> Box<dyn Iterator<Item = Listed>> {
            match line {
                Err(e) => Box::new(std::iter::once(Err(Box::new((
                    source.clone(),
                    Error::io(&source, e),
                ))))),
                Ok(mut bytes) => {
                    if bytes.last() == Some(&b'\r') {
                        bytes.pop();
                    }
                    if bytes.is_empty() {
                        return Box::new(std::iter::empty());
                    }
                    Box::new(list(std::iter::once(path_from_bytes(bytes))))
                }
            }
        })
}

#[cfg(unix)]
fn path_from_bytes(bytes: Vec<u8>) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    std::ffi::OsString::from_vec(bytes).into()
}

#[cfg(not(unix))]
fn path_from_bytes(bytes: Vec<u8>) -> PathBuf {
    String::from_utf8_lossy(&bytes).into_owned().into()
}

/// Image files under a folder, recursively, lazily, sorted by name within each folder; hidden
/// entries below the root skipped.
fn walk(root: &Path) -> impl Iterator<Item = Listed> {
    walkdir::WalkDir::new(root)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !is_hidden(e.path()))
        .filter_map(|entry| match entry {
            Ok(e) => {
                (e.file_type().is_file() && looks_like_image(e.path())).then(|| Ok(e.into_path()))
            }
            Err(e) => {
                let path = e.path().map(Path::to_path_buf).unwrap_or_default();
                let io = e
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("file system loop"));
                Some(Err(Box::new((path.clone(), Error::io(&path, io)))))
            }
        })
}

/// Image files of the inputs, collected ([`list`]): the files, and the inputs that could not be
/// read beside them.
pub fn collect_files(inputs: &[PathBuf]) -> (Vec<PathBuf>, Vec<Error>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for item in list(inputs.iter().cloned()) {
        match item {
            Ok(p) => out.push(p),
            Err(unlisted) => problems.push(unlisted.1),
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

/// Image files under a folder, recursively, sorted; the first folder that cannot be read is the
/// error.
pub fn collect_images(dir: &Path) -> Result<Vec<PathBuf>> {
    walk(dir).map(|item| item.map_err(|u| u.1)).collect()
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
