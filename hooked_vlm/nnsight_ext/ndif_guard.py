"""Pure-python policy for the self-hosted NDIF stack: payload cap, API key, bind check, job ids, client errors.

Imported by the server side (``ndif_api`` in the gunicorn API and dispatcher, ``ndif_server`` in the
model actor) and by the unit tests; it imports nothing beyond the standard library, so every rule
here is testable without starting the stack.

Trust model (see scripts/ndif/README.md): a remote trace is trusted code that runs in the model
actor's process; whoever can reach the API can run code there and read any result whose id they
know. So the API refuses to bind beyond loopback unless an API key is configured.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import sysconfig
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

MIB = 1 << 20
#: Default request-body cap: large enough for a 64-frame video or a few 1344x1344 images in fp32.
DEFAULT_MAX_REQUEST_MB = 512
MAX_REQUEST_ENV = "HOOKED_VLM_NDIF_MAX_REQUEST_MB"
API_KEY_ENV = "HOOKED_VLM_NDIF_API_KEY"
API_KEY_HEADER = "ndif-api-key"
#: Longest error text sent to a client (the first line is always kept whole).
MAX_CLIENT_ERROR_CHARS = 2000
#: Redis key prefix of the job registry (accepted request ids, with the server run that took them).
JOB_KEY_PREFIX = "hvlm:job:"
JOB_TTL_S = 7 * 24 * 3600


def max_request_bytes(environ: Optional[dict] = None) -> int:
    """The request-body cap in bytes, from ``HOOKED_VLM_NDIF_MAX_REQUEST_MB`` (MiB; default 512)."""
    raw = (os.environ if environ is None else environ).get(MAX_REQUEST_ENV)
    if raw is None or raw == "":
        return DEFAULT_MAX_REQUEST_MB * MIB
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{MAX_REQUEST_ENV}={raw!r} is not a number of MiB (e.g. 512)") from None
    if mb <= 0:
        raise ValueError(f"{MAX_REQUEST_ENV}={raw!r} must be a positive number of MiB (e.g. 512)")
    return int(mb * MIB)


def payload_refusal(size_bytes: int, limit_bytes: int) -> Optional[str]:
    """The message refusing a request body of ``size_bytes``, or None when it fits under the cap."""
    if size_bytes <= limit_bytes:
        return None
    return (
        f"request body is {size_bytes / MIB:.1f} MiB, over this server's limit of "
        f"{limit_bytes / MIB:.1f} MiB ({MAX_REQUEST_ENV}): send fewer or smaller inputs per trace "
        f"(split the batch, fewer frames, smaller images), or raise {MAX_REQUEST_ENV} where the server starts"
    )


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for 0.0.0.0 and every other address."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: Optional[str]) -> None:
    """Refuse to serve beyond loopback without an API key (anyone reaching the API runs code on it)."""
    if not is_loopback_host(host) and not api_key:
        raise PermissionError(
            f"refusing to bind the NDIF API to {host}: beyond loopback an API key is required, because "
            f"a remote trace runs as trusted code on the server; set {API_KEY_ENV} (clients send it as "
            f"NDIF_API_KEY) or bind to 127.0.0.1"
        )


def api_key_accepted(configured: Optional[str], presented: Optional[str]) -> bool:
    """Whether a request carrying ``presented`` may pass; no configured key means no check."""
    if not configured:
        return True
    if presented is None:
        return False
    return hmac.compare_digest(configured.encode(), presented.encode())


def api_key_refusal(presented: Optional[str]) -> str:
    """The 401/403 text for a missing or wrong key."""
    if presented is None:
        return f"this NDIF server requires an API key: set NDIF_API_KEY (or CONFIG.API.APIKEY) on the client"
    return "the API key sent in the ndif-api-key header is not this server's key"


# ----- job registry: tell "not yet" from "never" / "lost in a restart" ----------------------------------------


@dataclass(frozen=True)
class JobRecord:
    """What the registry knows of a request id: the server run (boot id) that accepted it."""

    boot_id: str


def unknown_job_description(job_id: str, record: Optional[JobRecord], boot_id: str) -> Optional[str]:
    """Why polling ``job_id`` (with no stored response) can never succeed, or None if it still may.

    None: the job was accepted by this server run and has not answered yet (keep polling).
    """
    if record is None:
        return (
            f"unknown job id {job_id}: this NDIF server never accepted a request with that id "
            f"(another server, a typo, or older than {JOB_TTL_S // 86400} days); submit the trace again"
        )
    if record.boot_id != boot_id:
        return (
            f"job {job_id} was accepted before the server restarted and did not survive it; "
            f"submit the trace again (retryable)"
        )
    return None


def error_response_json(job_id: str, description: str) -> dict:
    """A nnsight ``ResponseModel`` payload with status ERROR, which the client raises as its message."""
    return {"id": job_id, "status": "ERROR", "description": description}


# ----- client-facing errors: the user's line first, server frames trimmed ------------------------------------


def _internal_roots() -> tuple[str, ...]:
    """Directories whose frames are server internals: the stdlib, site-packages and hooked_vlm itself."""
    paths = sysconfig.get_paths()
    roots = {paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"]}
    roots.add(str(Path(__file__).resolve().parents[1]))
    return tuple(sorted(str(Path(r).resolve()) + os.sep for r in roots if r))


def is_internal_frame(filename: str, roots: Iterable[str]) -> bool:
    """True for frames of installed or standard-library code (and frames with no real file, like ``<frozen>``)."""
    if filename.startswith("<") and not filename.startswith("<nnsight"):
        return True
    try:
        resolved = str(Path(filename).resolve())
    except (OSError, RuntimeError):
        resolved = filename
    return any(resolved.startswith(root) for root in roots)


def format_client_error(
    exc_type: str,
    message: str,
    frames: list[traceback.FrameSummary],
    roots: Iterable[str],
    limit: int = MAX_CLIENT_ERROR_CHARS,
) -> str:
    """``"Type: message"`` first, then only the user's own frames; internal ones are counted, not shown."""
    roots = tuple(roots)
    head = f"{exc_type}: {message}" if message else exc_type
    user = [f for f in frames if not is_internal_frame(f.filename, roots)]
    lines = [head]
    if user:
        lines.append("in your trace:")
        for frame in user[-5:]:
            lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}')
            if frame.line:
                lines.append(f"    {frame.line.strip()}")
    internal, older = len(frames) - len(user), len(user) - len(user[-5:])
    if internal:
        lines.append(f"({internal} server-internal frames trimmed)")
    if older:
        lines.append(f"({older} earlier frames of your trace trimmed)")
    text = "\n".join(lines)
    if len(text) > limit:
        first = lines[0]
        text = first if len(first) >= limit else text[:limit].rstrip() + "\n(... truncated)"
    return text


def client_error_message(exception: BaseException) -> str:
    """The text a client sees for ``exception`` raised while running its trace on the server."""
    frames = list(traceback.extract_tb(exception.__traceback__))
    message = str(exception).strip()
    return format_client_error(type(exception).__name__, message, frames, _internal_roots())
