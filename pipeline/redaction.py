"""What of a tracking URI may be shown: its password and tokens masked, everywhere it is printed,
logged to MLflow, recorded beside a sweep or stored in a checkpoint. Only the process that
connects to the store (the sweep's driver, `pipeline.fit --track`) holds the URI as given.

The tracking side's rule, kept outside `pipeline.tracking` (and free of MLflow) so that the plain
training loop can mask the config it writes into checkpoints without depending on the tracking
package.
"""

from __future__ import annotations

import re

from cpm_model.config import ExperimentConfig, from_dict

REDACTED = "***"
# Query parameters that carry credentials (password=, sslpassword=, token=, access_token=, api_key=).
_SECRET_QUERY_KEY = re.compile(r"pass|pwd|token|secret|key", re.IGNORECASE)
_QUERY_PARAM = re.compile(r"([?&;])([^=&;#]*)=([^&;#]+)")


def _secret_spans(uri: str | None) -> list[tuple[int, int]]:
    """(start, end) of each secret in a URI: the password of `user:password@host` and the values
    of credential query parameters (`?password=`, `?token=`)."""
    if not uri or "://" not in uri:
        return []
    begin = uri.index("://") + 3
    query = min((i for i in (uri.find("?", begin), uri.find("#", begin)) if i >= 0), default=len(uri))
    spans = []
    at = uri.rfind("@", begin, query)  # the last '@': an unescaped '/' in a password is still caught
    colon = uri.find(":", begin, at) if at >= 0 else -1
    if colon >= 0 and at > colon + 1:
        spans.append((colon + 1, at))
    spans += [m.span(3) for m in _QUERY_PARAM.finditer(uri, query) if _SECRET_QUERY_KEY.search(m[2])]
    return spans


def uri_secrets(uri: str | None) -> list[str]:
    """The secrets of a URI as written (to scrub them from error text as well)."""
    return [uri[a:b] for a, b in _secret_spans(uri)]


def redact_uri(uri: str | None) -> str | None:
    """The URI with every secret replaced by ***; a URI without one is returned unchanged."""
    for a, b in reversed(_secret_spans(uri)):
        uri = uri[:a] + REDACTED + uri[b:]
    return uri


def public_config(config: ExperimentConfig) -> ExperimentConfig:
    """The config with its tracking URI's secrets masked: the form that is printed, written to
    config.yaml and checkpoints, logged as MLflow params and handed to Tune's trials. A config
    without secrets is returned as it is."""
    uri = config.tracking.tracking_uri
    shown = redact_uri(uri)
    if shown is uri:
        return config
    data = config.to_dict()  # a copy: the caller's config keeps the URI it connects with
    data["tracking"]["tracking_uri"] = shown
    return from_dict(data)
