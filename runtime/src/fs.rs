//! File helpers: atomic writes, hashing, and the one rule for where a command may write.
//!
//! The rule (README, "Where commands write"): a missing output folder is created; an existing
//! folder of the same kind (a bundle where a bundle is written, a report where a report is written,
//! ...) is replaced, atomically, only with `--force`; any other existing folder is a parent, and the
//! output goes to a new sub-folder of it. Nothing a command did not create is deleted or replaced.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Writes `rows` (the header first) as a CSV file (the `csv` crate's quoting), atomically.
pub fn write_csv<R, F>(path: &Path, rows: impl IntoIterator<Item = R>) -> Result<()>
where
    R: IntoIterator<Item = F>,
    F: AsRef<[u8]>,
{
    let fail = |e: csv::Error| Error::io(path, std::io::Error::other(e));
    let mut w = csv::Writer::from_writer(Vec::new());
    for row in rows {
        w.write_record(row).map_err(fail)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    write_atomic(path, &bytes)
}

/// What a writer keeps beside its target while it works: a temporary file, a staging folder, the
/// old folder moved aside. Named `.NAME.KIND-PID` in the target's folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sidecar {
    Tmp,
    Staging,
    Replaced,
}

impl Sidecar {
    fn tag(self) -> &'static str {
        match self {
            Sidecar::Tmp => "tmp",
            Sidecar::Staging => "staging",
            Sidecar::Replaced => "replaced",
        }
    }

    /// The sidecar of `target` for this process.
    pub fn of(self, target: &Path) -> PathBuf {
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        parent_of(target).join(format!(".{name}.{}-{}", self.tag(), std::process::id()))
    }

    /// Whether a file name is one of this kind's (any target, any process).
    fn names(self, file_name: &str) -> bool {
        file_name.starts_with('.') && file_name.contains(&format!(".{}-", self.tag()))
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder, synced, then renamed, so a
/// crash leaves either the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.file_name().is_none() {
        return Err(Error::BadPath(format!(
            "{}: not a file path",
            path.display()
        )));
    }
    let tmp = Sidecar::Tmp.of(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// The folder a path lives in (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The kinds of folder the tools write, each recognised by the files it always holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A model bundle (`manifest.json`).
    Bundle,
    /// An evaluation report (`report.json`).
    Report,
    /// A training run (`run.json`).
    Run,
    /// A trainer checkpoint (`config.json`, `model.safetensors` and the trainer's `provenance.json`
    /// or `state.json`; a plain HF download is not one).
    Checkpoint,
}

impl OutputKind {
    pub fn noun(self) -> &'static str {
        match self {
            OutputKind::Bundle => "model bundle",
            OutputKind::Report => "evaluation report",
            OutputKind::Run => "training run",
            OutputKind::Checkpoint => "checkpoint",
        }
    }

    /// Whether `dir` holds a folder of this kind.
    pub fn is_in(self, dir: &Path) -> bool {
        let has = |f: &str| dir.join(f).is_file();
        match self {
            OutputKind::Bundle => has("manifest.json"),
            OutputKind::Report => has("report.json"),
            OutputKind::Run => has("run.json"),
            OutputKind::Checkpoint => {
                has("config.json")
                    && has("model.safetensors")
                    && (has("provenance.json") || has("state.json"))
            }
        }
    }
}

/// Where a command asked to write `kind` into `requested` writes, by the rule of this module.
/// `name` gives the sub-folder's name when `requested` is a folder of something else.
pub fn resolve_output(
    requested: &Path,
    kind: OutputKind,
    name: impl FnOnce() -> String,
    force: bool,
) -> Result<PathBuf> {
    let target = match std::fs::metadata(requested) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(requested.to_path_buf()),
        Err(e) => return Err(Error::io(requested, e)),
        Ok(m) if !m.is_dir() => {
            return Err(Error::OutputConflict {
                path: requested.to_path_buf(),
                reason: format!(
                    "exists and is not a folder; give a folder for the {}",
                    kind.noun()
                ),
            })
        }
        Ok(_) if kind.is_in(requested) || is_empty_dir(requested) => requested.to_path_buf(),
        // Any other folder is a parent: the output goes into a sub-folder of its own.
        Ok(_) => {
            let name = name();
            if name.is_empty() || !is_contained(&name) || name.contains('/') {
                return Err(Error::OutputConflict {
                    path: requested.to_path_buf(),
                    reason: format!("{name:?} is not a usable folder name"),
                });
            }
            let sub = requested.join(name);
            match std::fs::metadata(&sub) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(sub),
                Err(e) => return Err(Error::io(&sub, e)),
                Ok(m) if m.is_dir() && (kind.is_in(&sub) || is_empty_dir(&sub)) => sub,
                Ok(_) => {
                    return Err(Error::OutputConflict {
                        path: sub,
                        reason: format!(
                            "exists and is not a {}; nothing was written (choose another --out or name)",
                            kind.noun()
                        ),
                    })
                }
            }
        }
    };
    if kind.is_in(&target) && !force {
        return Err(Error::OutputConflict {
            path: target,
            reason: format!(
                "is an existing {}; pass --force to replace it, or choose another --out",
                kind.noun()
            ),
        });
    }
    Ok(target)
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}

/// A folder built beside its target under a hidden name, then moved into place in one rename:
/// a crash or an error leaves the old folder (if any) as it was and no half-written new one.
#[derive(Debug)]
pub struct StagedDir {
    target: PathBuf,
    staging: PathBuf,
}

impl StagedDir {
    /// Starts a folder that will become `target` (resolve it with [`resolve_output`] first).
    pub fn new(target: &Path) -> Result<StagedDir> {
        let parent = parent_of(target);
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        if target.file_name().is_none() {
            return Err(Error::BadPath(format!(
                "{}: not a folder path",
                target.display()
            )));
        }
        let staging = Sidecar::Staging.of(target);
        if staging.exists() {
            // Only a folder of this process's own name: left by an earlier crash of the same pid.
            std::fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        }
        std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        Ok(StagedDir {
            target: target.to_path_buf(),
            staging,
        })
    }

    /// The folder to write into.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the staged folder into place. An existing target (resolved as replaceable) is moved
    /// aside first and removed only once the new folder is in place.
    pub fn commit(self) -> Result<PathBuf> {
        replace_dir(&self.staging, &self.target)?;
        Ok(self.target.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if self.staging.exists() {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// Renames `from` to `to`; an existing `to` is renamed aside first, then removed.
pub fn replace_dir(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        let old = Sidecar::Replaced.of(to);
        std::fs::rename(to, &old).map_err(|e| Error::io(to, e))?;
        if let Err(e) = std::fs::rename(from, to) {
            // Put the old one back: the target must not be left missing.
            let _ = std::fs::rename(&old, to);
            return Err(Error::io(to, e));
        }
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(from, to).map_err(|e| Error::io(to, e))?;
    }
    Ok(())
}

/// Where a single output file goes: an existing file is replaced only with `force`; an existing
/// folder is a parent (the file goes inside it, named `name`).
pub fn resolve_output_file(requested: &Path, name: &str, force: bool) -> Result<PathBuf> {
    let path = if requested.is_dir() {
        requested.join(name)
    } else {
        requested.to_path_buf()
    };
    if path.is_dir() {
        return Err(Error::OutputConflict {
            path,
            reason: "is a folder; give a file name".into(),
        });
    }
    if path.exists() && !force {
        return Err(Error::OutputConflict {
            path,
            reason: "exists; pass --force to replace it, or choose another --out".into(),
        });
    }
    Ok(path)
}

/// The staging and replaced-aside folders (`.NAME.staging-PID`, `.NAME.replaced-PID`) that writers
/// of this module leave in `dir` only when a process dies mid-write: what a test of "nothing left
/// behind" looks for.
pub fn leftovers(dir: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let name = entry.map_err(|e| Error::io(dir, e))?.file_name();
        let name = name.to_string_lossy();
        if Sidecar::Staging.names(&name) || Sidecar::Replaced.names(&name) {
            found.push(name.into_owned());
        }
    }
    Ok(found)
}

/// A relative path that stays inside its folder (a bundle, a data set): no `..`, no root, no drive, not empty.
pub fn is_contained(path: &str) -> bool {
    let p = Path::new(path);
    !path.is_empty()
        && !path.contains('\\')
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_rule() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // Missing: used as it is.
        let missing = root.join("new");
        assert_eq!(
            resolve_output(&missing, OutputKind::Bundle, || "x".into(), false).unwrap(),
            missing
        );
        // A folder of something else: a parent.
        let user = root.join("models");
        std::fs::create_dir(&user).unwrap();
        std::fs::write(user.join("README.md"), "mine").unwrap();
        assert_eq!(
            resolve_output(&user, OutputKind::Bundle, || "b".into(), false).unwrap(),
            user.join("b")
        );
        // An existing bundle: only with force.
        let b = user.join("b");
        std::fs::create_dir(&b).unwrap();
        std::fs::write(b.join("manifest.json"), "{}").unwrap();
        assert!(resolve_output(&b, OutputKind::Bundle, || "x".into(), false).is_err());
        assert!(resolve_output(&user, OutputKind::Bundle, || "b".into(), false).is_err());
        assert_eq!(
            resolve_output(&user, OutputKind::Bundle, || "b".into(), true).unwrap(),
            b
        );
        // A sub-folder of the same name that is something else: refused even with force.
        let other = user.join("notes");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("a.txt"), "mine").unwrap();
        assert!(resolve_output(&user, OutputKind::Bundle, || "notes".into(), true).is_err());
        // A file where a folder is wanted.
        assert!(resolve_output(
            &user.join("README.md"),
            OutputKind::Report,
            || "r".into(),
            true
        )
        .is_err());
        // A bundle is not a report.
        assert_eq!(
            resolve_output(&b, OutputKind::Report, || "r".into(), false).unwrap(),
            b.join("r")
        );
    }

    #[test]
    fn staged_dir_replaces_only_on_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("report.json"), "old").unwrap();
        {
            let s = StagedDir::new(&target).unwrap();
            std::fs::write(s.path().join("report.json"), "new").unwrap();
            // dropped without commit: the old folder stays, the staging folder goes
        }
        assert_eq!(
            std::fs::read_to_string(target.join("report.json")).unwrap(),
            "old"
        );
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        let s = StagedDir::new(&target).unwrap();
        std::fs::write(s.path().join("report.json"), "new").unwrap();
        s.commit().unwrap();
        assert_eq!(
            std::fs::read_to_string(target.join("report.json")).unwrap(),
            "new"
        );
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}

/// How [`StreamedFile::open`] treats its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamMode {
    /// A new file; an existing one is an error (nothing is replaced unasked).
    Create,
    /// Continue a file of results (`--skip-done` on the same file), after ending the line a
    /// killed run may have left half written, so that line stays one bad line and no result is
    /// glued to it.
    Append,
    /// Replace an existing file (`--force`): written beside it and renamed over it at
    /// [`finish`](StreamedFile::finish), so the old file stays whole until the new one is.
    Replace,
}

/// A file of results written as they come (`classify --out`), flushed after every batch so a
/// killed run keeps what it finished.
pub struct StreamedFile {
    file: std::io::BufWriter<std::fs::File>,
    target: PathBuf,
    /// Set with [`StreamMode::Replace`]: the sidecar being written.
    tmp: Option<PathBuf>,
}

impl StreamedFile {
    pub fn open(path: &Path, mode: StreamMode) -> Result<StreamedFile> {
        if path.is_dir() {
            return Err(Error::OutputConflict {
                path: path.to_path_buf(),
                reason: "is a folder; give a file name".into(),
            });
        }
        let io = |e| Error::io(path, e);
        let mut options = std::fs::OpenOptions::new();
        let (file, tmp) = match mode {
            StreamMode::Create => (
                options.write(true).create_new(true).open(path).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        Error::OutputConflict {
                            path: path.to_path_buf(),
                            reason: "exists; pass --force to replace it, or --skip-done with the same file to continue it".into(),
                        }
                    } else {
                        io(e)
                    }
                })?,
                None,
            ),
            StreamMode::Append => {
                let mut f = options
                    .read(true)
                    .append(true)
                    .create(true)
                    .open(path)
                    .map_err(io)?;
                let len = f.metadata().map_err(io)?.len();
                if len > 0 {
                    use std::io::{Read, Seek, SeekFrom};
                    let mut last = [0u8; 1];
                    f.seek(SeekFrom::Start(len - 1)).map_err(io)?;
                    f.read_exact(&mut last).map_err(io)?;
                    if last[0] != b'\n' {
                        f.write_all(b"\n").map_err(io)?;
                    }
                }
                (f, None)
            }
            StreamMode::Replace => {
                let tmp = Sidecar::Tmp.of(path);
                let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
                (f, Some(tmp))
            }
        };
        Ok(StreamedFile {
            file: std::io::BufWriter::new(file),
            target: path.to_path_buf(),
            tmp,
        })
    }

    /// Flushes, syncs and (for a replacement) renames over the target.
    pub fn finish(mut self) -> Result<()> {
        let target = self.target.clone();
        self.file.flush().map_err(|e| Error::io(&target, e))?;
        self.file
            .get_ref()
            .sync_all()
            .map_err(|e| Error::io(&target, e))?;
        if let Some(tmp) = self.tmp.take() {
            std::fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
        }
        Ok(())
    }
}

impl Write for StreamedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for StreamedFile {
    /// An unfinished replacement leaves the old file as it was.
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}
