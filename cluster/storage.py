"""Where index files live: a local path or an object-store URI (s3://, gs://), through pyarrow.fs.

Every read and write of index roots and build work directories goes through these functions, so
the rest of the code never asks which kind of store it has. S3 credentials and endpoint come from
the usual AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import posixpath
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs


def is_uri(location: str | Path) -> bool:
    """Whether `location` names an object store (has a scheme) rather than a local path."""
    return "://" in str(location)


def join(location: str | Path, *parts: str) -> str:
    """`location/part/...` for a local path or a URI."""
    if is_uri(location):
        return posixpath.join(str(location).rstrip("/"), *parts)
    return str(Path(location).joinpath(*parts))


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI; ValueError naming a bad URI."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).absolute())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"cannot open storage location {str(location)!r}: {error}") from error


def exists(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(location: str | Path) -> int:
    """Bytes of one file; FileNotFoundError naming it when absent."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no file at {str(location)!r}")
    return int(info.size)


def list_names(location: str | Path) -> list[str]:
    """Names directly under a directory or prefix (empty when it does not exist)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path)))


def make_dirs(location: str | Path) -> None:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def read_bytes(location: str | Path) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file so that a reader sees the old content or the new, never a part.

    Local files are written aside and renamed; an object store makes a PUT visible only when it
    completes."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        aside = f"{path}.{uuid.uuid4().hex}.part"
        with fs.open_output_stream(aside) as stream:
            stream.write(data)
        fs.move(aside, path)
        return
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def upload(local_file: str | Path, location: str | Path) -> None:
    """Copy one local file to `location`, visible only once complete."""
    fs, path = resolve(location)
    source = str(Path(local_file).absolute())
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        aside = f"{path}.{uuid.uuid4().hex}.part"
        pafs.copy_files(source, aside, source_filesystem=fs, destination_filesystem=fs)
        fs.move(aside, path)
        return
    pafs.copy_files(source, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(location: str | Path, local_file: str | Path) -> None:
    """Copy `location` to a local file, written aside and renamed into place."""
    fs, path = resolve(location)
    target = Path(local_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    aside = target.with_name(f"{target.name}.{uuid.uuid4().hex}.part")
    pafs.copy_files(path, str(aside), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    aside.rename(target)


def delete_dir(location: str | Path) -> None:
    """Remove a directory or prefix and everything under it; nothing when absent."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def copy_file(source: str | Path, target: str | Path) -> None:
    """Copy one file between locations of any kind, visible at `target` only once complete."""
    source_fs, source_path = resolve(source)
    if isinstance(source_fs, pafs.LocalFileSystem):
        upload(source_path, target)
        return
    fs, path = resolve(target)
    if not isinstance(fs, pafs.LocalFileSystem):
        pafs.copy_files(source_path, path, source_filesystem=source_fs, destination_filesystem=fs)
        return
    download(source, target)
