//! Progress bars, one style for every long job of the toolkit (indicatif hides them when stderr is
//! not a terminal, e.g. in tests and CI logs).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps named `message` ("images", "epoch 3", ...).
pub fn bar(len: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:<24} {bar:32} {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template"),
    );
    bar.set_message(message.to_string());
    bar
}

/// A counter for a job of unknown length (a streamed listing): how many, how fast.
pub fn counter(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{msg:<24} {spinner} {pos} {per_sec}")
            .expect("valid template"),
    );
    bar.set_message(message.to_string());
    bar
}
