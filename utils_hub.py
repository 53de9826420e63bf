"""Hugging Face Hub helpers shared by data.py and models.py.

Reachability probe: one metadata request, one timeout, no retries, so a missing repo
or a dead network fails in seconds instead of after huggingface_hub's retry loop.
Callers turn a :class:`HubProbeError` into their own error type and advice.

Imports only ``huggingface_hub`` and the standard library, never a project module.
"""

from __future__ import annotations

import huggingface_hub
from huggingface_hub import errors as hf_errors

# Seconds allowed for the single metadata request that decides whether a Hub repo is
# reachable. huggingface_hub's own loaders retry for ~20 s on network errors, which is
# what probing first, without retries, avoids.
HUB_PROBE_TIMEOUT_S = 5.0

# Why a probe failed: the ``kind`` of a HubProbeError.
BAD_ID = "bad_id"  # the Hub can never accept this id (checked first, also offline)
OFFLINE = "offline"  # HF_HUB_OFFLINE=1: nothing was asked
GATED = "gated"
NOT_FOUND = "not_found"  # no such repo, or a private one
NO_REVISION = "no_revision"
NO_FILE = "no_file"
NETWORK = "network"  # any other failure: DNS, timeout, proxy, HTTP 5xx


class HubProbeError(Exception):
    """The Hub cannot serve a repo (or a file in it).

    Attributes:
        kind: one of ``BAD_ID``, ``OFFLINE``, ``GATED``, ``NOT_FOUND``,
            ``NO_REVISION``, ``NO_FILE``, ``NETWORK``.

    ``str(err)`` is a short reason, without advice, to put into an error message.
    """

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def probe_hub_repo(repo_id: str, *, repo_type: str = "model", revision: str | None = None,
                   filename: str | None = None) -> None:
    """Check with one quick request that the Hub serves ``repo_id`` (and ``filename`` in it).

    Args:
        repo_id: ``"namespace/name"`` or ``"name"``.
        repo_type: ``"model"`` or ``"dataset"``.
        revision: branch, tag or commit; None for the default branch.
        filename: a file that must exist in the repo; its metadata is fetched
            instead of the repo's.

    Raises:
        HubProbeError: ``BAD_ID`` for a malformed id (even offline), ``OFFLINE``
            when ``HF_HUB_OFFLINE=1`` (no request made), else ``GATED``,
            ``NOT_FOUND``, ``NO_REVISION``, ``NO_FILE`` or ``NETWORK``.
        ValueError: ``repo_type`` is neither "model" nor "dataset".
    """
    if repo_type not in ("model", "dataset"):
        raise ValueError(f"repo_type must be 'model' or 'dataset', got {repo_type!r}")
    try:
        huggingface_hub.utils.validate_repo_id(repo_id)
    except hf_errors.HFValidationError as err:
        raise HubProbeError(BAD_ID, f"not a valid Hub id: {err}") from None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise HubProbeError(OFFLINE, "HF_HUB_OFFLINE=1")
    try:
        if filename is None:
            huggingface_hub.HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision,
                                              timeout=HUB_PROBE_TIMEOUT_S)
        else:
            url = huggingface_hub.hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision)
            huggingface_hub.get_hf_file_metadata(url, timeout=HUB_PROBE_TIMEOUT_S)
    # GatedRepoError is a RepositoryNotFoundError, so it comes first.
    except hf_errors.GatedRepoError:
        raise HubProbeError(GATED, "the repo is gated: accept its terms on the Hub and log in") from None
    except hf_errors.RepositoryNotFoundError:
        what = "dataset repo" if repo_type == "dataset" else "repo"
        raise HubProbeError(NOT_FOUND, f"no such {what}, or it is private") from None
    except hf_errors.RevisionNotFoundError:
        raise HubProbeError(NO_REVISION, f"revision {revision!r} does not exist") from None
    except hf_errors.EntryNotFoundError as err:
        if filename is None:  # only a file request can miss an entry; anything else is unexpected
            raise HubProbeError(NETWORK, f"{type(err).__name__}: {err}") from None
        raise HubProbeError(NO_FILE, f"the repo has no {filename}") from None
    except hf_errors.HFValidationError as err:
        raise HubProbeError(BAD_ID, f"not a valid Hub id: {err}") from None
    except Exception as err:  # connection failures surface from several HTTP stacks
        raise HubProbeError(NETWORK, f"{type(err).__name__}: {err}") from None
