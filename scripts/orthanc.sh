#!/usr/bin/env bash
# Runs a throw-away Orthanc PACS (Debian's `orthanc` package) on loopback, with xray-clip's DICOM
# node configured as its modality `xrayclip`, in the foreground until it is stopped (Ctrl-C or
# SIGTERM). Its database and storage live in WORKDIR; nothing else is touched.
#
#   scripts/orthanc.sh WORKDIR HTTP_PORT DICOM_PORT NODE_PORT [NODE_AE_TITLE]
#
# Then, with the node running (`runtime serve --dicom 127.0.0.1:NODE_PORT --results r.jsonl`):
#   curl -s --data-binary @image.dcm http://127.0.0.1:HTTP_PORT/instances         # upload
#   curl -s -d '{"Resources": ["<instance ID>"], "Synchronous": true}' \
#        http://127.0.0.1:HTTP_PORT/modalities/xrayclip/store                     # C-STORE to the node
#   curl -s -X POST -d '' http://127.0.0.1:HTTP_PORT/modalities/xrayclip/echo     # C-ECHO
# In a real PACS the node is added the same way: a modality with the node's AE title, host and port.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
WORK="$1"; HTTP_PORT="$2"; DICOM_PORT="$3"; NODE_PORT="$4"; NODE_AE="${5:-XRAYCLIP}"
command -v Orthanc >/dev/null || { echo "error: Orthanc is not installed (scripts/setup.sh installs it)" >&2; exit 2; }
mkdir -p "$WORK/storage"
cat > "$WORK/orthanc.json" <<EOF
{
  "Name": "xray-clip test PACS",
  "StorageDirectory": "$WORK/storage",
  "IndexDirectory": "$WORK/storage",
  "HttpPort": $HTTP_PORT,
  "DicomPort": $DICOM_PORT,
  "DicomAet": "ORTHANC",
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "HttpServerEnabled": true,
  "DicomServerEnabled": true,
  "DicomAlwaysAllowStore": true,
  "DicomCheckCalledAet": false,
  "DicomScuTimeout": 30,
  "DicomAssociationCloseDelay": 0,
  "Plugins": [],
  "DicomModalities": { "xrayclip": ["$NODE_AE", "127.0.0.1", $NODE_PORT] }
}
EOF
exec Orthanc "$WORK/orthanc.json"
