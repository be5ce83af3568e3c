"""A hub model's config.json, for `dpo plan` on a laptop: the file the model initializer reads
in the cluster, fetched as the Hugging Face Hub serves raw files
(`<endpoint>/<repo>/resolve/<revision>/config.json`). HF_ENDPOINT (a mirror) and HF_TOKEN (gated
and private models) are honoured as huggingface_hub honours them.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

HUB = "https://huggingface.co"
TIMEOUT_SECONDS = 10.0


class HubRefusedError(Exception):
    """The hub answered: no such model or revision, or not for these credentials."""


class HubUnreachableError(Exception):
    """No answer from the hub (offline, a proxy, a timeout)."""


def hub_config(repo: str, revision: str | None, timeout: float = TIMEOUT_SECONDS) -> dict[str, Any]:
    endpoint = os.environ.get("HF_ENDPOINT", HUB).rstrip("/")
    at = revision or "main"
    url = f"{endpoint}/{quote(repo, safe='/')}/resolve/{quote(at, safe='')}/config.json"
    headers = {"User-Agent": "dpo-operator"}
    token = os.environ.get("HF_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            loaded: dict[str, Any] = json.loads(answer.read())
            return loaded
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            raise HubRefusedError(
                f"{repo}: the hub refused config.json ({error.code}): a gated or private model; "
                "set HF_TOKEN to a token of an account that may read it"
            ) from None
        if error.code == 404:
            raise HubRefusedError(
                f"{repo}@{at}: no config.json on the hub (404); check spec.model.name and "
                "spec.model.revision"
            ) from None
        raise HubUnreachableError(f"{endpoint} answered {error.code} for {url}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise HubUnreachableError(f"cannot reach {endpoint} ({reason})") from None
    except json.JSONDecodeError:
        raise HubRefusedError(f"{repo}@{at}: config.json on the hub is not JSON") from None
