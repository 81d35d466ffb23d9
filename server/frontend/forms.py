"""Multipart bodies parsed with a per-file size limit enforced while the body streams in."""
from __future__ import annotations

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header
from starlette.requests import Request

from server.errors import ApiError


class _LimitedParser(MultiPartParser):
    """Starlette's parser, refusing (413) a file part as soon as it passes `max_file_bytes`, and the
    first file past `max_files` with the same 413 whatever the count (Starlette's own check says 400)."""

    def __init__(self, *args: object, max_file_bytes: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.max_file_bytes = max_file_bytes
        self._file_bytes = 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._file_bytes = 0

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._current_part.content_disposition)
        if b"filename" in options and self._current_files >= self.max_files:
            raise ApiError(413, "payload_too_large",
                           f"more than {self.max_files} files; at most {self.max_files} per request")
        super().on_headers_finished()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is not None:
            self._file_bytes += end - start
            if self._file_bytes > self.max_file_bytes:
                raise ApiError(413, "payload_too_large",
                               f"a file part exceeds {self.max_file_bytes} bytes; the rest was not read")
        super().on_part_data(data, start, end)


async def parse_form(request: Request, *, max_file_bytes: int, max_files: int, max_fields: int,
                     max_part_size: int = 64 * 1024) -> FormData:
    """The request's multipart form; close it (`await form.close()`) when done. A file part larger
    than `max_file_bytes` is refused with 413 after about that many bytes, not after the body."""
    parser = _LimitedParser(request.headers, request.stream(), max_files=max_files, max_fields=max_fields,
                            max_part_size=max_part_size, max_file_bytes=max_file_bytes)
    try:
        return await parser.parse()
    except MultiPartException as e:
        raise ApiError(400, "bad_request", f"invalid multipart body: {e.message}") from e
