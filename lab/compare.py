"""Compare what an SCP stored through the relay with what the same SCP stored directly.

Usage: compare.py RELAYED_DIR REFERENCE_DIR EXPECTED_COUNT

Files are matched by SOP Instance UID. For each pair the transfer syntax and the dataset bytes
(everything after the File Meta Information, which names the sender and so differs) must be
identical. Prints one line per instance and exits 1 on any difference or a missing instance.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydicom.filereader import _read_file_meta_info, read_preamble


def dataset_bytes(path: Path) -> tuple[str, str, bytes]:
    with path.open("rb") as fp:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        body = fp.read()
    return str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID), body


def load(directory: Path) -> dict[str, tuple[str, bytes, Path]]:
    out = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        uid, ts, body = dataset_bytes(path)
        out[uid] = (ts, body, path)
    return out


def main() -> int:
    relayed_dir, reference_dir, expected = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    relayed, reference = load(relayed_dir), load(reference_dir)
    ok = len(relayed) == expected and len(reference) == expected
    print(f"  instances: relayed {len(relayed)}, direct {len(reference)}, sent {expected}")
    for uid in sorted(set(relayed) | set(reference)):
        if uid not in relayed or uid not in reference:
            print(f"  MISSING {'relayed' if uid not in relayed else 'direct'}: {uid}")
            ok = False
            continue
        (ts_a, body_a, path), (ts_b, body_b, _) = relayed[uid], reference[uid]
        same = ts_a == ts_b and body_a == body_b
        ok &= same
        print(
            f"  {'identical' if same else 'DIFFERENT'}  {len(body_a):>9} bytes  ts {ts_a}"
            f"{'' if ts_a == ts_b else ' (direct: ' + ts_b + ')'}  {path.name}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
