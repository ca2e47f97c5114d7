"""The languages sshwasm builds: a new language is one module with `LANGUAGES`, plus one line here.

A file is matched by its extension, a project directory by the manifest it holds (the
first language in this order whose manifest is there wins).
"""

from __future__ import annotations

from pathlib import Path

from sshwasm.errors import UsageError

from . import c, go, rust
from .language import WASM_SUFFIX, Language

LANGUAGES: tuple[Language, ...] = (
    *rust.LANGUAGES,
    *c.LANGUAGES,
    *go.LANGUAGES,
)

_BY_SUFFIX: dict[str, Language] = {
    suffix: language for language in LANGUAGES for suffix in language.suffixes
}
_BY_MANIFEST: dict[str, Language] = {
    language.manifest: language for language in LANGUAGES if language.manifest is not None
}


def detect_language(source: Path) -> str:
    """The language of `source` by its extension, or by the manifest in a project directory.

    UsageError for an unsupported extension or a directory that is no known project.
    """
    if source.is_dir():
        return project_language(source).name
    if source.suffix.lower() == WASM_SUFFIX:
        return "wasm"
    return file_language(source).name


def file_language(source: Path) -> Language:
    """The language that builds the file `source`, by its extension; UsageError if none."""
    language = _BY_SUFFIX.get(source.suffix.lower())
    if language is None:
        supported = ", ".join([*_BY_SUFFIX, WASM_SUFFIX])
        manifests = " or ".join(_BY_MANIFEST)
        raise UsageError(
            f"cannot build {source}: unsupported file type "
            f"(supported: {supported}, or a directory with {manifests})"
        )
    return language


def project_language(directory: Path) -> Language:
    """The language of the project in `directory`, by its manifest; UsageError if none."""
    for manifest, language in _BY_MANIFEST.items():
        if (directory / manifest).is_file():
            return language
    manifests = " or ".join(_BY_MANIFEST)
    raise UsageError(f"{directory} is a directory without {manifests}: no project to build")
