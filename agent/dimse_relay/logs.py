"""Structured logging. JSON lines by default; extra fields carry association ids and AE titles
of configured listeners/targets, never dataset content."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

# Elements whose values are redacted from every log line, even with logging.log_identifiers
# (which lets pynetdicom log identifiers and responses element by element, as
# "(gggg,eeee) VR [value]"): names, IDs, birth dates, accession numbers, addresses, phones.
REDACTED_TAGS = (
    "0008,0050",  # Accession Number
    "0008,0090",  # Referring Physician's Name
    "0010,0010",  # Patient's Name
    "0010,0020",  # Patient ID
    "0010,0030",  # Patient's Birth Date
    "0010,1000",  # Other Patient IDs
    "0010,1001",  # Other Patient Names
    "0010,1040",  # Patient's Address
    "0010,2154",  # Patient's Telephone Numbers
)
_REDACT = re.compile(r"(\((?:" + "|".join(REDACTED_TAGS) + r")\) [A-Z]{2} )\[[^\]\n]*\]", re.I)


# Structured fields that identify an association, a peer or an instance: association ids, AE
# titles (and NATS subjects, which contain them), SOP Instance UIDs, file paths of stored
# instances. They are written only when the agent logs at debug level.
IDENTIFYING_FIELDS = frozenset(
    {"assoc_id", "listener", "target", "ae_titles", "subject", "sop_instance_uid", "path"}
)


class IdentifierFilter(logging.Filter):
    """Drops IDENTIFYING_FIELDS from records unless debug logging is on."""

    def __init__(self, debug: bool):
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.debug:
            for key in IDENTIFYING_FIELDS & vars(record).keys():
                delattr(record, key)
        return True


class RedactingFilter(logging.Filter):
    """Replaces the values of REDACTED_TAGS in a record's message with [redacted]."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "(00" in message:
            redacted = _REDACT.sub(r"\1[redacted]", message)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


class AsyncioNoiseFilter(logging.Filter):
    """Drops the asyncio warning every TLS connection to NATS logs when the server closes it
    (nats-py's stream protocol asks to keep the half-closed connection open, which TLS cannot
    do; the connection is closed and nats-py reconnects as designed). The agent logs the
    disconnect itself, so the line only alarmed operators."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "asyncio"
            and record.getMessage().startswith("returning true from eof_received()")
        )


class MoveDestinationFilter(logging.Filter):
    """pynetdicom logs a C-MOVE's unknown destination AE title at error level; the listener
    logs the event itself (info, without the AE title). The line is kept at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        return not (
            record.name.startswith("pynetdicom")
            and record.getMessage().startswith("Unknown Move Destination")
        )


class JsonFormatter(logging.Formatter):
    def __init__(self, agent: str):
        super().__init__()
        self.agent = agent

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "agent": self.agent,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.levelno >= logging.ERROR:
            out["exc"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = {
            k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")
        }
        tail = " ".join(f"{k}={v}" for k, v in extras.items())
        return f"{record.levelname:<7} {record.name}: {record.getMessage()} {tail}".rstrip()


def setup_logging(level: str, fmt: str, agent: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(AsyncioNoiseFilter())
    handler.addFilter(MoveDestinationFilter())
    handler.addFilter(RedactingFilter())
    handler.addFilter(IdentifierFilter(debug=level == "debug"))
    handler.setFormatter(JsonFormatter(agent) if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # nats-py logs connection errors itself; our callbacks already report them.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
