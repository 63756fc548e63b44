#!/usr/bin/env bash
# Send a real study through the deployed lab in both directions and check what arrived.
#   edge modality (storescu, AET MODALITY) -> edge agent listener CLOUD_SCP -> NATS leaf ->
#   cloud cluster -> cloud agent target -> cloud SCP (storescp CLOUD_SCP)
#   cloud SCU (storescu, AET CLOUD_SCU) -> cloud agent listener EDGE.PACS -> cluster -> leaf ->
#   edge agent target -> edge PACS (storescp EDGE.PACS)
#   and again edge -> cloud through the queued listener (port 11115) with the cloud agent
#   stopped: Success from the leaf's JetStream, delivered once the agent is back
# The same files also go directly from the same SCU to an identically configured reference
# storescp on the sending host; the relayed copies must be byte-identical to those.
# Exit status 0 only if every instance arrived identical with DIMSE status Success (0000H).
set -euo pipefail
# shellcheck source=lab/lib.sh
source "$(dirname "$0")/lib.sh"
need_root

PY=${PY:-$REPO_DIR/.venv/bin/python}
DATA=$("$PY" -c 'import pydicom.data,os;print(os.path.dirname(pydicom.data.get_testdata_file("CT_small.dcm")))')
# Ten instances with unique SOP Instance UIDs: CT, MR, RT plan/dose/structures, secondary
# captures with overlay, palette and RGB, an ECG waveform and a structured report (1.4 MB).
# Override with DIMSE_LAB_STUDY="a.dcm b.dcm" (file names in pydicom's test_files).
read -r -d "" -a FILES <<<"${DIMSE_LAB_STUDY:-CT_small.dcm MR_small.dcm rtplan.dcm rtdose.dcm rtstruct.dcm
  examples_overlay.dcm examples_palette.dcm examples_rgb_color.dcm waveform_ecg.dcm test-SR.dcm}" || true
STUDY=/var/lib/lab-dicom/study
fail=0

# $1 host, $2 stored-by-relay dir, $3 reference dir, $4 calling AET, $5 called AET, $6 relay port
# $7 "queued": send with the far agent stopped (host:unit), start it after the Success, wait
send() {
  local host=$1 relayed=$2 reference=$3 calling=$4 called=$5 port=$6 queued=${7:-} root out
  root=$LAB_HOSTS_DIR/$host/root
  log "$host: $calling -> $called through the relay ($(printf '%s ' "${FILES[@]}" | wc -w) files)"
  lab_exec "$host" sh -c "rm -rf $STUDY && mkdir -p $STUDY"
  for f in "${FILES[@]}"; do cp "$DATA/$f" "$root$STUDY/$f"; done
  if [[ -n $queued ]]; then
    # New SOP Instance UIDs on every run: the edge queue stores an instance it already
    # delivered (same UID and bytes) only once, so a re-run would deliver nothing.
    "$PY" - "$root$STUDY" <<'PY'
import pathlib
import sys

import pydicom
from pydicom.uid import generate_uid

for path in pathlib.Path(sys.argv[1]).iterdir():
    ds = pydicom.dcmread(path, force=True)
    ds.SOPInstanceUID = generate_uid()
    if getattr(ds, "file_meta", None) is not None and "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path)
PY
  fi
  lab_exec "${relayed%%:*}" sh -c "rm -f /var/lib/lab-dicom/${relayed#*:}/*"
  lab_exec "$host" sh -c "rm -f /var/lib/lab-dicom/$reference/*"
  if [[ -n $queued ]]; then
    log "stopping ${queued#*:} on ${queued%%:*}: the far side is down while the study is sent"
    lab_exec "${queued%%:*}" systemctl stop "${queued#*:}"
  fi
  local t0=$EPOCHREALTIME
  out=$(lab_exec "$host" env TCP_NODELAY=1 /usr/bin/storescu -v -R -aet "$calling" -aec "$called" \
    127.0.0.1 "$port" "${FILES[@]/#/$STUDY/}" 2>&1) || { log "storescu through the relay failed"; fail=1; }
  local t1=$EPOCHREALTIME
  if [[ -n $queued ]]; then
    local dir=$LAB_HOSTS_DIR/${relayed%%:*}/root/var/lib/lab-dicom/${relayed#*:} waited=0
    if compgen -G "$dir/*" >/dev/null; then log "instances arrived while the far side was down"; fail=1; fi
    log "starting ${queued#*:} on ${queued%%:*}: the queue delivers"
    lab_exec "${queued%%:*}" systemctl start "${queued#*:}"
    while (($(find "$dir" -type f | wc -l) < ${#FILES[@]} && waited < 120)); do
      sleep 1; waited=$((waited + 1))
    done
    sleep 2  # the last storescp child finishes writing
    printf '  delivered from the queue %d s after the far agent was started\n' "$waited"
  fi
  local ok n
  n=${#FILES[@]}
  ok=$(grep -c 'Received Store Response (Success)' <<<"$out" || true)
  printf '  relayed in %.2f s; DIMSE statuses: %s\n' "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" \
    "$(grep -o 'Received Store Response ([^)]*)' <<<"$out" | sed 's/Received Store Response //' | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
  if [[ $ok != "$n" ]]; then
    log "expected $n Success responses, got $ok"; grep -E '^[EW]:' <<<"$out" | head -20 >&2; fail=1
  fi
  lab_exec "$host" env TCP_NODELAY=1 /usr/bin/storescu -R -aet "$calling" -aec "$called" \
    127.0.0.1 11199 "${FILES[@]/#/$STUDY/}" >/dev/null 2>&1 || { log "direct reference transfer failed"; fail=1; }
  sleep 0.5  # storescp --fork children finish writing
  "$PY" "$LAB_DIR/compare.py" "$LAB_HOSTS_DIR/${relayed%%:*}/root/var/lib/lab-dicom/${relayed#*:}" \
    "$root/var/lib/lab-dicom/$reference" "$n" || fail=1
}

echo "== edge modality -> cloud SCP"
send edge cloud:scp reference MODALITY CLOUD_SCP 11112
echo "== cloud SCU -> edge PACS"
send cloud edge:pacs reference CLOUD_SCU EDGE.PACS 11112
echo "== edge modality -> cloud SCP, queued listener, cloud agent down while sending"
send edge cloud:scp reference MODALITY CLOUD_SCP 11115 cloud:dimse-relay.service

if ((fail)); then
  echo "demo: FAILED"
  exit 1
fi
echo "demo: OK, every instance relayed byte-identical with status Success in both directions,"
echo "      and through the edge queue while the cloud agent was down"
