"""An object-store target (s3://, gs://, az://): versions are uploaded and read back to check
their digests; `current` is one object write. On S3 the write is conditional (`If-Match` the
ETag of the pointer that was compared, `If-None-Match: *` when there was none), so the store
refuses it once another run wrote the pointer. Other stores have no such write here, so the API
refuses `mustBeatPromoted` with them."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from dpo_contract.manifest import verify_manifest
from dpo_contract.pod import BadInputError
from dpo_contract.reports import PromotionResult

from dpo_trainer.io.artifacts import download_folder, upload_folder
from dpo_trainer.publish.pointer import (
    ANY,
    CURRENT,
    PointerChangedError,
    PointerTarget,
    pointer_bytes,
)


class ObjectStoreTarget(PointerTarget):
    @property
    def writes_conditionally(self) -> bool:
        return "s3" in self.fs.protocol

    def pointer_and_tag(self) -> tuple[PromotionResult | None, str | None]:
        # The tag is read first: a pointer replaced in between makes the write fail rather than
        # succeed on a stale compare.
        if not self.writes_conditionally:
            return super().pointer_and_tag()
        path = f"{self.root}/{CURRENT}"
        try:
            tag = str(self.fs.info(path, refresh=True)["ETag"])
        except FileNotFoundError:
            return None, None
        return PromotionResult.model_validate_json(self.fs.cat_file(path)), tag

    def copy(self, adapter: Path, destination: str, digest: str) -> None:
        upload_folder(self.fs, adapter, destination)
        check = Path(tempfile.mkdtemp(prefix="dpo-verify-"))
        try:
            download_folder(self.fs, destination, check)
            if verify_manifest(check) != digest:
                raise BadInputError(f"{destination}: the uploaded copy does not match the manifest")
        finally:
            shutil.rmtree(check, ignore_errors=True)

    def write_pointer(self, pointer: PromotionResult, tag: str | None) -> None:
        path = f"{self.root}/{CURRENT}"
        content = pointer_bytes(pointer)
        if tag == ANY or not self.writes_conditionally:
            self.fs.pipe_file(path, content)  # one object write: atomic on object stores
            return
        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        try:
            self.fs.pipe_file(path, content, **condition)
        except OSError as error:
            if _is_precondition_failed(error):
                raise PointerChangedError(path) from error
            raise


def _is_precondition_failed(error: BaseException) -> bool:
    """Whether S3 answered 412 PreconditionFailed (s3fs wraps botocore's error)."""
    cause: BaseException | None = error
    while cause is not None:
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                return True
        cause = cause.__cause__ or cause.__context__
    return False
