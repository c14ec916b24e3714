//! The DICOM node of `runtime serve` (`--dicom ADDR --ae-title AE`): a Storage SCP (C-STORE) and
//! Verification SCP (C-ECHO) on dicom-rs's upper layer, one thread per association.
//!
//! It accepts the projection X-ray storage classes ([`XRAY_STORAGE_CLASSES`]) in the transfer
//! syntaxes this build decodes ([`transfer_syntaxes`]) and rejects other presentation contexts in
//! the association negotiation (abstract or transfer syntax not supported). It announces
//! `--max-pdu` and refuses larger PDUs; what it sends fits the peer's announced maximum (dicom-ul
//! checks both). Each instance is classified and written as one JSON line to `--results`
//! (appended), optionally kept unchanged under `--store` and posted to `--post`; the C-STORE
//! response says whether that worked. The images are never edited.

use std::io::{Cursor, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dicom_core::{dicom_value, DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::{file::ReadPreamble, FileMetaTableBuilder, InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::{Pdu, ServerAssociation, ServerAssociationOptions};
use tokio::sync::{oneshot, Semaphore};

use super::model::{DicomStatusLabel, Job, Service};
use crate::fs::{StreamMode, StreamedFile};
use crate::image::decode::decode_bytes;
use crate::image::preprocess::preprocess;
use crate::text::body_part;

/// The storage classes of projection radiography, the images this classifier is for.
pub const XRAY_STORAGE_CLASSES: &[(&str, &str)] = &[
    (
        "1.2.840.10008.5.1.4.1.1.1",
        "Computed Radiography Image Storage",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.1",
        "Digital X-Ray Image Storage - For Presentation",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "Digital X-Ray Image Storage - For Processing",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.2",
        "Digital Mammography X-Ray Image Storage - For Presentation",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.2.1",
        "Digital Mammography X-Ray Image Storage - For Processing",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.3",
        "Digital Intra-Oral X-Ray Image Storage - For Presentation",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.1.3.1",
        "Digital Intra-Oral X-Ray Image Storage - For Processing",
    ),
];

/// The Verification SOP class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

/// Largest DIMSE command (they are a few hundred bytes; anything near this is not one).
const MAX_COMMAND: usize = 64 << 10;

/// C-STORE response statuses (PS3.4 Annex B, PS3.7 Annex C).
mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// Processing failure: the result could not be written, the model is gone.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// The instance's SOP class is not the one of its presentation context.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Refused: out of resources (the instance is larger than --max-body).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: cannot understand (the image cannot be decoded).
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

#[derive(Debug, Clone)]
pub struct DicomOptions {
    pub addr: SocketAddr,
    /// This node's AE title; associations calling another title are rejected.
    pub ae_title: String,
    /// JSON lines, one per received instance, appended.
    pub results: PathBuf,
    /// Each JSON line is also POSTed here (`http://HOST:PORT/PATH`).
    pub post: Option<axum::http::Uri>,
    /// Received instances are kept here, unchanged, as `<SOPInstanceUID>.dcm`.
    pub store: Option<PathBuf>,
    /// Largest PDU this node receives (announced in the association).
    pub max_pdu: u32,
    /// Associations served at once; more wait to be accepted.
    pub max_associations: usize,
    /// An association with no PDU for this long is closed.
    pub idle_timeout: Duration,
    /// Largest instance in bytes (larger ones are refused with status A700).
    pub max_instance: usize,
}

/// The transfer syntaxes this build decodes (the same test as the decoder's), by UID.
pub fn transfer_syntaxes() -> Vec<&'static str> {
    TransferSyntaxRegistry
        .iter()
        .filter(|ts| ts.can_decode_all())
        .map(|ts| ts.uid())
        .collect()
}

/// A bound DICOM listener with its results file open, not yet serving.
pub(super) struct Node {
    listener: tokio::net::TcpListener,
    options: DicomOptions,
    results: StreamedFile,
}

/// What every association thread shares.
struct Shared {
    service: Arc<Service>,
    options: DicomOptions,
    results: Mutex<StreamedFile>,
    transfer_syntaxes: Vec<&'static str>,
    /// The server's runtime, for posting results from association threads.
    runtime: tokio::runtime::Handle,
}

impl Node {
    /// Checks the options, opens the results file (appending) and the store folder, and binds.
    pub(super) async fn open(options: &DicomOptions) -> anyhow::Result<Node> {
        let title = options.ae_title.trim();
        if title.is_empty()
            || title.len() > 16
            || !title.chars().all(|c| c.is_ascii_graphic() || c == ' ')
            || title.contains('\\')
        {
            anyhow::bail!(
                "--ae-title {:?}: an AE title is 1 to 16 printable ASCII characters, no backslash",
                options.ae_title
            );
        }
        if let Some(post) = &options.post {
            if post.scheme_str() != Some("http") || post.host().is_none() {
                anyhow::bail!("--post {post}: give an http://HOST[:PORT]/PATH address");
            }
        }
        if let Some(dir) = &options.store {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("--store {}: {e}", dir.display()))?;
        }
        let results = StreamedFile::open(&options.results, StreamMode::Append)?;
        let listener = tokio::net::TcpListener::bind(options.addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (--dicom): {e}", options.addr))?;
        Ok(Node {
            listener,
            options: DicomOptions {
                ae_title: title.to_string(),
                ..options.clone()
            },
            results,
        })
    }

    pub(super) fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts associations until `shutdown` (at most `--max-associations` at once, each on its own
    /// thread), then waits for those open to end.
    pub(super) async fn serve(
        self,
        service: Arc<Service>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let Node {
            listener,
            options,
            results,
        } = self;
        let transfer_syntaxes = transfer_syntaxes();
        tracing::info!(
            "DICOM node {} listening on {} (transfer syntaxes: {})",
            options.ae_title,
            listener
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            transfer_syntaxes.join(", ")
        );
        let permits = Arc::new(Semaphore::new(options.max_associations.max(1)));
        let shared = Arc::new(Shared {
            service,
            options,
            results: Mutex::new(results),
            transfer_syntaxes,
            runtime: tokio::runtime::Handle::current(),
        });
        let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                p = Arc::clone(&permits).acquire_owned() => p.expect("the semaphore is never closed"),
                _ = &mut shutdown => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("DICOM accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            let stream = match stream.into_std().and_then(|s| {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(s)
            }) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("DICOM connection from {peer}: {e}");
                    continue;
                }
            };
            let shared = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name("dicom-association".into())
                .spawn(move || {
                    if let Err(e) = association(stream, &shared) {
                        tracing::warn!("DICOM association from {peer}: {e}");
                    }
                    drop(permit);
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => tracing::warn!("DICOM association from {peer}: no thread: {e}"),
            }
            threads.retain(|t| !t.is_finished());
        }
        drop(listener);
        drop(shared);
        // Associations in flight end when their peers release them (or go idle).
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        tracing::info!("DICOM node stopped");
    }
}

/// The C-STORE being received on an association.
struct Incoming {
    message_id: u16,
    context_id: u8,
    sop_class: String,
    sop_instance: String,
    data: Vec<u8>,
    /// Set once the data passed `--max-body`: the rest is read and dropped.
    too_large: bool,
}

fn association(stream: TcpStream, shared: &Shared) -> Result<(), String> {
    let o = &shared.options;
    let mut options = ServerAssociationOptions::new()
        .accept_called_ae_title()
        .ae_title(o.ae_title.as_str())
        .max_pdu_length(o.max_pdu)
        .strict(true)
        .read_timeout(o.idle_timeout)
        .write_timeout(o.idle_timeout)
        .with_abstract_syntax(VERIFICATION);
    for (uid, _) in XRAY_STORAGE_CLASSES {
        options = options.with_abstract_syntax(*uid);
    }
    for ts in &shared.transfer_syntaxes {
        options = options.with_transfer_syntax(*ts);
    }
    let mut association = options
        .establish(stream)
        .map_err(|e| format!("association refused: {e}"))?;
    let calling = {
        use dicom_ul::association::Association;
        association.peer_ae_title().to_string()
    };
    let contexts = association.presentation_contexts();
    let accepted = contexts
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .count();
    for pc in contexts
        .iter()
        .filter(|pc| pc.reason != PresentationContextResultReason::Acceptance)
    {
        tracing::info!(
            "{calling}: presentation context {} ({}) rejected: {:?}",
            pc.id,
            pc.abstract_syntax,
            pc.reason
        );
    }
    tracing::info!(
        "association from {calling}: {accepted} of {} presentation contexts accepted, max PDU {} in, {} out",
        contexts.len(),
        association.acceptor_max_pdu_length(),
        association.requestor_max_pdu_length()
    );
    let mut command: Vec<u8> = Vec::new();
    let mut incoming: Option<Incoming> = None;
    loop {
        let pdu = association.receive().map_err(|e| e.to_string())?;
        match pdu {
            Pdu::PData { data } => {
                for pdv in data {
                    match pdv.value_type {
                        PDataValueType::Command => {
                            if command.len() + pdv.data.len() > MAX_COMMAND {
                                let _ = association.abort();
                                return Err("a DIMSE command over 64 KiB: aborted".into());
                            }
                            command.extend_from_slice(&pdv.data);
                            if pdv.is_last {
                                let cmd = std::mem::take(&mut command);
                                match on_command(
                                    &mut association,
                                    &cmd,
                                    pdv.presentation_context_id,
                                )? {
                                    Some(store) => incoming = Some(store),
                                    None => continue,
                                }
                            }
                        }
                        PDataValueType::Data => {
                            let Some(store) = incoming.as_mut() else {
                                let _ = association.abort();
                                return Err("data before a C-STORE command: aborted".into());
                            };
                            if store.context_id != pdv.presentation_context_id {
                                let _ = association.abort();
                                return Err("data on another presentation context: aborted".into());
                            }
                            if !store.too_large {
                                if store.data.len() + pdv.data.len() > o.max_instance {
                                    store.too_large = true;
                                    store.data = Vec::new();
                                } else {
                                    store.data.extend_from_slice(&pdv.data);
                                }
                            }
                            if pdv.is_last {
                                let store = incoming.take().expect("checked above");
                                let ts = association
                                    .presentation_contexts()
                                    .iter()
                                    .find(|pc| pc.id == store.context_id)
                                    .map(|pc| {
                                        (pc.transfer_syntax.clone(), pc.abstract_syntax.clone())
                                    });
                                let (code, comment) = match ts {
                                    Some((ts, abstract_syntax)) => {
                                        received(shared, &calling, &store, &ts, &abstract_syntax)
                                    }
                                    None => (
                                        status::PROCESSING_FAILURE,
                                        Some("unknown presentation context".into()),
                                    ),
                                };
                                shared
                                    .service
                                    .metrics
                                    .instances
                                    .get_or_create(&DicomStatusLabel {
                                        status: format!("{code:04X}"),
                                    })
                                    .inc();
                                let rsp = store_response(&store, code, comment.as_deref());
                                send_command(&mut association, store.context_id, &rsp)?;
                            }
                        }
                    }
                }
            }
            Pdu::ReleaseRQ => {
                let _ = association.send(&Pdu::ReleaseRP);
                tracing::info!("association from {calling} released");
                return Ok(());
            }
            Pdu::AbortRQ { source } => {
                return Err(format!("aborted by the peer ({source:?})"));
            }
            other => {
                let _ = association.abort();
                return Err(format!("unexpected {}: aborted", other.short_description()));
            }
        }
    }
}

/// Handles one complete DIMSE command: answers C-ECHO, returns the C-STORE whose data follows.
fn on_command(
    association: &mut ServerAssociation<TcpStream>,
    bytes: &[u8],
    context_id: u8,
) -> Result<Option<Incoming>, String> {
    // Commands are always implicit VR little endian.
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let cmd = InMemDicomObject::read_dataset_with_ts(bytes, &ts)
        .map_err(|e| format!("unreadable DIMSE command: {e}"))?;
    let int = |tag| -> Result<u16, String> {
        cmd.element(tag)
            .map_err(|e| format!("DIMSE command: {e}"))?
            .to_int::<u16>()
            .map_err(|e| format!("DIMSE command: {e}"))
    };
    let text = |tag| -> Result<String, String> {
        Ok(cmd
            .element(tag)
            .map_err(|e| format!("DIMSE command: {e}"))?
            .to_str()
            .map_err(|e| format!("DIMSE command: {e}"))?
            .trim_end_matches(['\0', ' '])
            .to_string())
    };
    match int(tags::COMMAND_FIELD)? {
        0x0030 => {
            let rsp = InMemDicomObject::command_from_element_iter([
                DataElement::new(
                    tags::AFFECTED_SOP_CLASS_UID,
                    VR::UI,
                    dicom_value!(Str, VERIFICATION),
                ),
                DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [0x8030])),
                DataElement::new(
                    tags::MESSAGE_ID_BEING_RESPONDED_TO,
                    VR::US,
                    dicom_value!(U16, [int(tags::MESSAGE_ID)?]),
                ),
                DataElement::new(
                    tags::COMMAND_DATA_SET_TYPE,
                    VR::US,
                    dicom_value!(U16, [0x0101]),
                ),
                DataElement::new(tags::STATUS, VR::US, dicom_value!(U16, [status::SUCCESS])),
            ]);
            send_command(association, context_id, &rsp)?;
            Ok(None)
        }
        0x0001 => Ok(Some(Incoming {
            message_id: int(tags::MESSAGE_ID)?,
            context_id,
            sop_class: text(tags::AFFECTED_SOP_CLASS_UID)?,
            sop_instance: text(tags::AFFECTED_SOP_INSTANCE_UID)?,
            data: Vec::new(),
            too_large: false,
        })),
        other => {
            let _ = association.send(&Pdu::AbortRQ {
                source: dicom_ul::pdu::AbortRQSource::ServiceProvider(
                    dicom_ul::pdu::AbortRQServiceProviderReason::UnexpectedPdu,
                ),
            });
            Err(format!(
                "DIMSE command {other:#06x} is not served here (C-STORE and C-ECHO are): aborted"
            ))
        }
    }
}

fn send_command(
    association: &mut ServerAssociation<TcpStream>,
    context_id: u8,
    cmd: &InMemDicomObject,
) -> Result<(), String> {
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let mut data = Vec::new();
    cmd.write_dataset_with_ts(&mut data, &ts)
        .map_err(|e| format!("cannot encode a response: {e}"))?;
    association
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data,
            }],
        })
        .map_err(|e| format!("cannot send a response: {e}"))
}

fn store_response(store: &Incoming, code: u16, comment: Option<&str>) -> InMemDicomObject {
    let mut elements = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            dicom_value!(Str, store.sop_class.as_str()),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [0x8001])),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            dicom_value!(U16, [store.message_id]),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0101]),
        ),
        DataElement::new(tags::STATUS, VR::US, dicom_value!(U16, [code])),
        DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            dicom_value!(Str, store.sop_instance.as_str()),
        ),
    ];
    if let Some(comment) = comment {
        // Error Comment is an LO: at most 64 characters.
        let short: String = comment.chars().take(64).collect();
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            dicom_value!(Str, short.as_str()),
        ));
    }
    InMemDicomObject::command_from_element_iter(elements)
}

/// A received instance as a DICOM file: preamble, file meta group, the data set exactly as sent.
fn as_file(store: &Incoming, transfer_syntax: &str) -> Result<Vec<u8>, String> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(store.sop_class.as_str())
        .media_storage_sop_instance_uid(store.sop_instance.as_str())
        .transfer_syntax(transfer_syntax)
        .build()
        .map_err(|e| format!("file meta group: {e}"))?;
    let mut file = Vec::with_capacity(store.data.len() + 512);
    file.extend_from_slice(&[0u8; 128]);
    file.extend_from_slice(b"DICM");
    meta.write(&mut file)
        .map_err(|e| format!("file meta group: {e}"))?;
    file.extend_from_slice(&store.data);
    Ok(file)
}

/// A UID usable as a file name: digits and dots, at most 64 characters (PS3.5 9.1).
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && !uid.starts_with('.')
}

/// Classifies, stores, records and posts one received instance; its C-STORE status and comment.
/// Every instance gets a line in `--results`, a refused one with its `error`.
fn received(
    shared: &Shared,
    calling: &str,
    store: &Incoming,
    transfer_syntax: &str,
    context_class: &str,
) -> (u16, Option<String>) {
    let mut line = serde_json::json!({
        "file": format!("{}.dcm", store.sop_instance),
        "calling_ae_title": calling,
        "sop_class_uid": store.sop_class,
        "sop_instance_uid": store.sop_instance,
    });
    let outcome = process(shared, store, transfer_syntax, context_class, &mut line);
    if let Err((_, e)) = &outcome {
        line["error"] = e.as_str().into();
    }
    if let Err(e) = record(shared, &line) {
        tracing::error!("--results {}: {e}", shared.options.results.display());
        return (
            status::PROCESSING_FAILURE,
            Some(format!("result not recorded: {e}")),
        );
    }
    if let Some(url) = &shared.options.post {
        if let Err(e) = shared.runtime.block_on(post(url, &line)) {
            tracing::warn!("--post {url}: {e} (the result is in --results)");
        }
    }
    match outcome {
        Ok(()) => (status::SUCCESS, None),
        Err((code, e)) => (code, Some(e)),
    }
}

/// Checks, stores (`--store`) and classifies an instance, filling its result line.
fn process(
    shared: &Shared,
    store: &Incoming,
    transfer_syntax: &str,
    context_class: &str,
    line: &mut serde_json::Value,
) -> Result<(), (u16, String)> {
    if store.too_large {
        return Err((
            status::OUT_OF_RESOURCES,
            format!(
                "instance over {} bytes (--max-body)",
                shared.options.max_instance
            ),
        ));
    }
    if store.sop_class != context_class {
        return Err((
            status::SOP_CLASS_NOT_SUPPORTED,
            "SOP class differs from the presentation context's".into(),
        ));
    }
    if !valid_uid(&store.sop_instance) {
        return Err((
            status::CANNOT_UNDERSTAND,
            "invalid Affected SOP Instance UID".into(),
        ));
    }
    let file = as_file(store, transfer_syntax).map_err(|e| (status::CANNOT_UNDERSTAND, e))?;
    let name = PathBuf::from(format!("{}.dcm", store.sop_instance));
    for (key, value) in identity(&file) {
        line[key] = value;
    }
    if let Some(dir) = &shared.options.store {
        let path = keep(dir, &name, &file).map_err(|e| {
            tracing::error!("--store {}: {e}", dir.display());
            (status::PROCESSING_FAILURE, format!("not stored: {e}"))
        })?;
        line["stored"] = path.display().to_string().into();
    }
    let scored = classify(shared, &file, &name)?;
    let examined = line["body_part_examined"].as_str().map(str::to_string);
    line["model"] = scored.line["model"].clone();
    line["top"] = scored.line["top"].clone();
    line["prediction"] = if scored.line["unknown"] == true {
        line["unknown"] = true.into();
        "unknown".into()
    } else {
        scored.line["top"][0]["label"].clone()
    };
    line["body_part_predicted"] = scored.term.into();
    line["body_part_mismatch"] = match (examined, scored.term) {
        (Some(e), Some(p)) => (!body_part::agrees(&e, p)).into(),
        _ => serde_json::Value::Null,
    };
    Ok(())
}

/// The instance's study and series UIDs and its `BodyPartExamined` (null when absent), read
/// without the pixel data.
fn identity(file: &[u8]) -> [(&'static str, serde_json::Value); 3] {
    let attrs = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .read_until(tags::PIXEL_DATA)
        .from_reader(Cursor::new(file))
        .ok();
    let text = |tag| -> serde_json::Value {
        attrs
            .as_ref()
            .and_then(|o| o.element_opt(tag).ok().flatten())
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
            .filter(|s| !s.is_empty())
            .into()
    };
    [
        ("study_instance_uid", text(tags::STUDY_INSTANCE_UID)),
        ("series_instance_uid", text(tags::SERIES_INSTANCE_UID)),
        ("body_part_examined", text(tags::BODY_PART_EXAMINED)),
    ]
}

struct Scored {
    /// The line of `classify --json`.
    line: serde_json::Value,
    /// The `BodyPartExamined` term the top label implies.
    term: Option<&'static str>,
}

/// Decode, preprocess, embed (through the shared encoder queue) and score.
fn classify(shared: &Shared, file: &[u8], name: &Path) -> Result<Scored, (u16, String)> {
    let service = &shared.service;
    let pixels = decode_bytes(file, name)
        .and_then(|img| preprocess(&img, &service.preprocessing))
        .map_err(|e| (status::CANNOT_UNDERSTAND, e.to_string()))?;
    let (reply, answer) = oneshot::channel();
    service
        .enqueue_waiting(Job::Image { pixels, reply })
        .map_err(|_| {
            (
                status::PROCESSING_FAILURE,
                "the encoder has stopped".to_string(),
            )
        })?;
    let embedding = answer
        .blocking_recv()
        .map_err(|_| (status::PROCESSING_FAILURE, "encoder gone".to_string()))?
        .map_err(|e| (status::PROCESSING_FAILURE, e))?;
    let probs = crate::scoring::probabilities(
        &embedding,
        &service.label_embeddings,
        service.calibrated_scale,
    );
    let top = crate::scoring::top_k(&probs, 1)[0];
    let mut line = crate::scoring::json_line(
        &name.display().to_string(),
        &service.model_name,
        &service.labels,
        &probs,
        service.top_k,
    );
    let unknown =
        crate::calibration::mark_unknown(&mut line, &embedding, &probs, service.reject.as_ref());
    Ok(Scored {
        line,
        // An "unknown" answer implies no body part.
        term: (!unknown)
            .then(|| body_part::term_for(&service.labels[top]))
            .flatten(),
    })
}

/// Keeps the instance under `dir` as written by the sender, never replacing a file: an instance
/// received twice is kept once.
fn keep(dir: &Path, name: &Path, file: &[u8]) -> std::io::Result<PathBuf> {
    let path = dir.join(name);
    let mut temp = tempfile::Builder::new();
    // Readable like any file written by this user (temporary files are private by default).
    #[cfg(unix)]
    temp.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut tmp = temp.tempfile_in(dir)?;
    tmp.write_all(file)?;
    tmp.as_file().sync_all()?;
    match tmp.persist_noclobber(&path) {
        Ok(_) => Ok(path),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
            tracing::info!("{} was already stored; kept as it is", path.display());
            Ok(path)
        }
        Err(e) => Err(e.error),
    }
}

/// Appends one line to `--results` and flushes it.
fn record(shared: &Shared, line: &serde_json::Value) -> std::io::Result<()> {
    let mut text = line.to_string();
    text.push('\n');
    let mut results = shared.results.lock().unwrap_or_else(|p| p.into_inner());
    results.write_all(text.as_bytes())?;
    results.flush()
}

/// POSTs one JSON line (HTTP/1.1, a 10 s bound); a non-2xx answer is an error.
async fn post(url: &axum::http::Uri, line: &serde_json::Value) -> Result<(), String> {
    let host = url.host().ok_or("no host")?;
    let port = url.port_u16().unwrap_or(80);
    let path = url.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let body = line.to_string();
    let send = async {
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = axum::http::Request::post(path)
            .header(axum::http::header::HOST, format!("{host}:{port}"))
            .header(axum::http::header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::from(body))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", response.status()))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), send)
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
}
