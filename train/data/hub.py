"""Fail fast when a run needs the Hugging Face Hub and cannot reach it.

Without network, each Hub call of transformers or datasets retries with back-off (DNS failures
included), printing a line per retry, and a run asks for several files: the seed's config spent
most of a minute printing retries before it said it could not start.
hub_unreachable() is asked right before the first Hub access of a run (a tokenizer or a dataset
named by Hub name): one request to the Hub's endpoint, through huggingface_hub's own HTTP client
(so HF_ENDPOINT and the proxy settings apply), with no retries and a timeout of
HF_HUB_ETAG_TIMEOUT seconds (huggingface_hub's metadata timeout, 10 by default). Any HTTP answer
means reachable. No answer is one line (the caller raises it as its DataError) naming the ways
to run offline. With
HF_HUB_OFFLINE set, nothing is probed: the libraries read their local cache and fail fast
themselves when a file is not there.
"""

from __future__ import annotations

OFFLINE_DEMO = "python -m train --config train/configs/demo.json"

_reachable: str | None = None  # the endpoint this process reached already (probed once)


def hub_unreachable(what: str) -> str | None:
    """None when the Hub is reachable (or HF_HUB_OFFLINE is set); else the error line saying
    that `what` (e.g. "tokenizer_name 'gpt2'", a name that is no local path) needs it, and the
    ways to run without it."""
    global _reachable
    try:
        from huggingface_hub import constants, get_session  # lazy: only a Hub name needs it
    except ImportError:  # no huggingface_hub: the caller's own import reports it
        return None
    if constants.HF_HUB_OFFLINE or _reachable == constants.ENDPOINT:
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as e:  # whatever the HTTP client raises (its classes vary by version)
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        return (
            f"{what}: no local file or folder of that name exists, and the Hugging Face Hub, where "
            f"it would be looked up, cannot be reached at {constants.ENDPOINT} ({reason}); with "
            "its files already in the local Hub cache set HF_HUB_OFFLINE=1, or set "
            "tokenizer_name and dataset_name to a local tokenizer folder and dataset file or "
            "folder (a relative path may start with ./), or try the offline demo: "
            f"{OFFLINE_DEMO}"
        )
    _reachable = constants.ENDPOINT
    return None
