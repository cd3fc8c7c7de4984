"""Attestation evidence for runs on a confidential VM (platform ``cvm``).

A run on platform ``cvm`` asks the guest kernel for a TEE report that binds a
fresh nonce: the report's 64-byte user data (``inblob``) is
``sha512(nonce || run id)``, so the report was made for this run and cannot be
replayed from another. Two interfaces are read, in this order:

- configfs-tsm (Linux 6.7+, vendor-neutral: AMD SEV-SNP and Intel TDX):
  ``<configfs>/tsm/report/<entry>/{inblob,outblob,provider,generation,auxblob}``;
- the SEV guest device ``/dev/sev-guest`` (SNP_GET_REPORT ioctl), for older
  SEV-SNP guests.

The record keeps the TEE type, the report's digest, whether the report
carries this run's nonce, and the report itself, so that its signature can be
checked later with the vendor's tools. The kit does not check that signature
(it needs the vendor's certificate chain), and says so: ``verified`` is false.

Without a TEE a ``cvm`` run fails with a message saying why, unless the
config allows ``runner.attestation: unattested``; such runs are recorded as
unattested and pages show them as such.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import secrets
import struct
from pathlib import Path

from privbench.wording import plural

CONFIGFS_ROOT = Path("/sys/kernel/config")
SEV_GUEST_DEVICE = Path("/dev/sev-guest")

# configfs-tsm provider name -> TEE type, and where each report format keeps the
# 64 bytes of user data it was asked to bind.
_TYPES = {"sev_guest": "sev-snp", "tdx_guest": "tdx"}
_SNP_REPORT_DATA_OFFSET = 0x50
_TDX_QUOTE_HEADER = 48
_TDX_REPORT_DATA_IN_BODY = 520  # TEE_TCB_SVN .. RTMR3 precede REPORTDATA in the TD quote body

# <linux/sev-guest.h>: SNP_GET_REPORT = _IOWR('S', 0x0, struct snp_guest_request_ioctl)
_SNP_GET_REPORT = 0xC0205300
_SNP_RESPONSE_SIZE = 4000
_SNP_REPORT_OFFSET = 32  # MSG_REPORT_RSP: status, report size, 24 reserved bytes, report

NOT_VERIFIED = ("signature not checked by the kit (it needs the vendor's certificate chain); "
                "the report is kept in the record under system.tee.evidence for checking with "
                "the vendor's tools (e.g. snpguest verify, Intel DCAP quote verification)")


class AttestationError(RuntimeError):
    """No usable TEE report for a run that needs one; the message says why."""


def report_data(nonce: bytes, run_id: str) -> bytes:
    """The 64 bytes a run's report must carry: sha512(nonce || run id)."""
    return hashlib.sha512(nonce + run_id.encode()).digest()


def attest_run(spec: dict, configfs_root: Path = CONFIGFS_ROOT,
               sev_guest: Path = SEV_GUEST_DEVICE) -> dict | None:
    """Evidence for one run (None unless its platform is cvm), under the run's policy.

    ``spec["attestation"]`` is ``required`` (default: no TEE, no run) or
    ``unattested`` (the run goes on, recorded as unattested).
    """
    if spec.get("platform") != "cvm":
        return None
    policy = spec.get("attestation", "required")
    try:
        return collect(spec["run_id"], configfs_root=configfs_root, sev_guest=sev_guest)
    except AttestationError as exc:
        if policy == "unattested":
            return {"status": "unattested", "type": None, "interface": None, "verified": False,
                    "reason": f"{exc}; allowed by runner.attestation: unattested"}
        raise AttestationError(
            f"platform 'cvm' needs TEE attestation evidence, but {exc}. Run on a confidential VM "
            "(AMD SEV-SNP or Intel TDX guest with configfs-tsm, Linux 6.7+, or /dev/sev-guest) with "
            "write access to its report interface, or set runner.attestation: unattested to run "
            "without evidence (every page then marks those results UNATTESTED)") from None


def collect(run_id: str, configfs_root: Path = CONFIGFS_ROOT, sev_guest: Path = SEV_GUEST_DEVICE,
            nonce: bytes | None = None, entry: str | None = None) -> dict:
    """A TEE report bound to a fresh nonce, as the record's ``system.tee``.

    ``configfs_root`` is where configfs is mounted (a fixture tree in tests);
    ``entry`` names the report entry (default: a fresh one, removed afterwards).
    """
    nonce = nonce if nonce is not None else secrets.token_bytes(32)
    user_data = report_data(nonce, run_id)
    reports = Path(configfs_root) / "tsm" / "report"
    if reports.is_dir():
        tee_type, provider, report, auxblob = _configfs_tsm_report(reports, user_data, entry)
        interface = "configfs-tsm"
    elif sev_guest.exists():
        tee_type, provider, report, auxblob = "sev-snp", "sev_guest", _sev_guest_report(sev_guest, user_data), None
        interface = "sev-guest"
    else:
        raise AttestationError(f"no TEE report interface was found (neither {reports} nor {sev_guest})")

    bound = _carries(tee_type, report, user_data)
    if bound is False:
        raise AttestationError(f"the {tee_type} report from {interface} does not carry this run's nonce "
                               "(a stale or replayed report)")
    return {
        "status": "attested",
        "type": tee_type,
        "interface": interface,
        "provider": provider,
        "nonce": nonce.hex(),
        "report_data": user_data.hex(),
        "report_sha256": hashlib.sha256(report).hexdigest(),
        "report_size": len(report),
        "nonce_bound": bound,
        "verified": False,
        "verification": NOT_VERIFIED,
        "evidence": {"report": base64.b64encode(report).decode(),
                     "auxblob": base64.b64encode(auxblob).decode() if auxblob else None},
    }


def _configfs_tsm_report(reports: Path, user_data: bytes, entry: str | None) -> tuple:
    """Write inblob, read outblob; the generation counter detects another writer in between."""
    path = reports / (entry or f"privbench-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.mkdir(exist_ok=entry is not None)  # a named entry may be reused, as the ABI allows
    except OSError as exc:
        raise AttestationError(f"cannot create the report entry {path} ({exc.strerror}; "
                               "the configfs-tsm interface needs root in the guest)") from None
    try:
        for _attempt in range(3):
            (path / "inblob").write_bytes(user_data)
            generation = _read_text(path / "generation")
            report = _read_bytes(path / "outblob")
            if _read_text(path / "generation") == generation:
                break
        else:
            raise AttestationError(f"{path} was rewritten by another process three times in a row")
        provider = _read_text(path / "provider")
        auxblob = _read_bytes(path / "auxblob", missing_ok=True)
    finally:
        if entry is None:
            with contextlib.suppress(OSError):  # an entry left behind is harmless
                path.rmdir()
    if not report:
        raise AttestationError(f"{path / 'outblob'} is empty")
    return _TYPES.get(provider, provider), provider, report, auxblob


def _read_bytes(path: Path, missing_ok: bool = False) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        # The kernel answers ENXIO/EINVAL for an attribute its provider lacks (e.g. TDX auxblob).
        if missing_ok and exc.errno in (errno.ENOENT, errno.ENXIO, errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise AttestationError(f"cannot read {path} ({exc.strerror})") from None


def _read_text(path: Path) -> str:
    return _read_bytes(path).decode().strip()


def _carries(tee_type: str, report: bytes, user_data: bytes) -> bool | None:
    """Whether the report's user-data field is ``user_data`` (None: unknown report format)."""
    if tee_type == "sev-snp":
        offset = _SNP_REPORT_DATA_OFFSET
    elif tee_type == "tdx":
        version = struct.unpack_from("<H", report, 0)[0] if len(report) >= 2 else None
        # quote v5 puts a 6-byte body descriptor (type, size) before the body
        offset = _TDX_QUOTE_HEADER + (6 if version == 5 else 0) + _TDX_REPORT_DATA_IN_BODY
    else:
        return None
    return report[offset:offset + len(user_data)] == user_data


def _sev_guest_report(device: Path, user_data: bytes) -> bytes:
    """SNP_GET_REPORT on the SEV guest device (struct layouts from <linux/sev-guest.h>)."""
    request = ctypes.create_string_buffer(user_data + struct.pack("<I", 0) + bytes(28), 96)  # user data, VMPL 0
    response = ctypes.create_string_buffer(_SNP_RESPONSE_SIZE)
    ioctl_arg = bytearray(struct.pack("<B7xQQQ", 1, ctypes.addressof(request), ctypes.addressof(response), 0))
    try:
        with open(device, "r+b", buffering=0) as handle:
            fcntl.ioctl(handle.fileno(), _SNP_GET_REPORT, ioctl_arg)
    except OSError as exc:
        firmware_error = struct.unpack_from("<Q", ioctl_arg, 24)[0]
        raise AttestationError(f"SNP_GET_REPORT on {device} failed ({exc.strerror}, "
                               f"firmware error {firmware_error:#x})") from None
    status, size = struct.unpack_from("<II", response.raw, 0)
    if status != 0 or not 0 < size <= _SNP_RESPONSE_SIZE - _SNP_REPORT_OFFSET:
        raise AttestationError(f"{device} answered status {status:#x} with a {size}-byte report")
    return response.raw[_SNP_REPORT_OFFSET:_SNP_REPORT_OFFSET + size]



def page_label(frame) -> str:
    """What a page says about the TEE of its runs (from the table's ``sys_tee_*`` columns)."""
    if "sys_tee_status" not in frame:
        return "none (no run on a confidential VM)"
    parts = []
    status = frame["sys_tee_status"]
    n_none = int(status.isna().sum())
    if n_none:
        parts.append(f"none for {plural(n_none, 'run')} (not on a confidential VM)")
    attested = frame[status == "attested"]
    for tee_type, group in attested.groupby("sys_tee_type"):
        parts.append(f"{tee_type}: {plural(len(group), 'run')} attested, each report bound to its run's nonce "
                     "(signatures not checked by the kit; reports kept in the records)")
    n_unattested = int((status == "unattested").sum())
    if n_unattested:
        parts.append(f"**UNATTESTED: {plural(n_unattested, 'run')} on platform cvm without TEE evidence** "
                     "(allowed by runner.attestation: unattested); they are not TEE results")
    return "; ".join(parts)
