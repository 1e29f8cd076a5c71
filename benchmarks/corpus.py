"""A corpus of real English text that installs offline, for pretraining the quality benchmark's model.

Every source is a Debian 12 package fetched with ``apt-get download`` (so any machine that reaches Debian's
archive makes the same corpus): documentation, books and, capped, dictionaries. Each package's text is extracted
(HTML to text without code blocks, navigation or tables; POD without verbatim blocks; the King James Bible through
its own reader; fortunes; dictd and WordNet entries), cleaned (paragraphs of prose only), deduplicated (repeated
paragraphs and documents), capped per package, and split by document into a training set and a held-out slice.

    python benchmarks/corpus.py --out .corpus        # about 5 minutes on 2 cores; writes:

    .corpus/train.txt.xz      documents separated by a line holding only DOCUMENT_SEPARATOR
    .corpus/heldout.txt.xz    the held-out documents (about 1 %), never trained on
    .corpus/SOURCES.md        every package: version, licence (from its copyright file), bytes contributed
    .corpus/sources.json      the same, for programs

The folder is git-ignored: the text is rebuilt from the packages, never committed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import json
import lzma
import random
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCUMENT_SEPARATOR = "\x1e"  # ASCII record separator, alone on its line; stripped from the text itself
HELDOUT_PER_MILLE = 10
MB = 1_000_000


@dataclass(frozen=True)
class Source:
    """One Debian package and how its text is read."""

    package: str
    reader: str  # a key of READERS
    kind: str  # documentation, book, quotations or dictionary
    include: tuple[str, ...]  # glob patterns under the package's extracted root
    exclude: tuple[str, ...] = ()  # regular expressions on the path relative to that root
    cap_mb: float | None = None  # most text (MB of UTF-8) the package contributes
    # Hand-read from the package's copyright file (the machine-readable `Files: *` licence is recorded beside it).
    licence: str = ""
    helper_packages: tuple[str, ...] = ()  # fetched too: a reader program, or the copyright file's home


SPHINX_NOISE = (r"/_sources/", r"/_static/", r"/_images/", r"genindex", r"/search\.html$", r"modindex\.html$")
SOURCES: tuple[Source, ...] = (
    Source(
        "linux-doc-6.1",
        "html",
        "documentation",
        ("usr/share/doc/linux-doc-6.1/html/**/*.html",),
        SPHINX_NOISE + (r"/translations/",),
        cap_mb=13,
        licence="GPL-2 (the kernel's documentation; some files GPL-2+ or dual-licensed)",
    ),
    Source(
        "python3.11-doc",
        "html",
        "documentation",
        ("usr/share/doc/python3.11/html/**/*.html",),
        SPHINX_NOISE + (r"whatsnew/changelog\.html$",),
        cap_mb=8,
        licence="PSF-2.0 (Python Software Foundation License)",
    ),
    Source(
        "rust-doc",
        "html",
        "documentation",
        tuple(
            f"usr/share/doc/rust-doc/html/{book}/**/*.html"
            for book in (
                "book",
                "reference",
                "nomicon",
                "edition-guide",
                "rust-by-example",
                "embedded-book",
                "rustc",
                "rustdoc",
                "cargo",
            )
        ),
        (r"/print\.html$", r"/toc\.html$", r"/404\.html$"),
        cap_mb=6,
        licence="MIT or Apache-2.0",
    ),
    Source(
        "debian-handbook",
        "html",
        "book",
        ("usr/share/doc/debian-handbook/html/en-US/*.html",),
        licence="GPL-2.0+ or CC-BY-SA-3.0",
    ),
    Source(
        "postgresql-doc-15",
        "html",
        "documentation",
        ("usr/share/doc/postgresql-doc-15/html/*.html",),
        (r"/bookindex\.html$", r"/release-", r"/errcodes-appendix\.html$"),
        cap_mb=6,
        licence="PostgreSQL (BSD-like)",
    ),
    Source(
        "perl-doc",
        "pod",
        "documentation",
        ("usr/share/perl/*/pod/*.pod",),
        (r"/perl5\d+delta\.pod$", r"/perltoc\.pod$"),
        cap_mb=6,
        licence="Artistic or GPL-1+ (Perl's licence)",
    ),
    Source(
        "git-doc",
        "html",
        "documentation",
        ("usr/share/doc/git-doc/*.html", "usr/share/doc/git-doc/**/*.html"),
        (r"/RelNotes/",),
        cap_mb=3,
        licence="GPL-2",
    ),
    Source(
        "python-django-doc",
        "html",
        "documentation",
        ("usr/share/doc/python-django-doc/html/**/*.html",),
        SPHINX_NOISE + (r"/releases/",),
        cap_mb=5,
        licence="BSD-3-Clause (Django)",
    ),
    Source(
        "apache2-doc",
        "html",
        "documentation",
        ("usr/share/doc/apache2-doc/manual/en/**/*.html",),
        cap_mb=3,
        licence="Apache-2.0",
    ),
    Source(
        "gimp-help-en",
        "html",
        "documentation",
        ("usr/share/gimp/2.0/help/en/*.html",),
        cap_mb=3,
        licence="GFDL-1.2 (no invariant sections; copyright file in gimp-help-common)",
        helper_packages=("gimp-help-common",),
    ),
    Source(
        "lilypond-doc-html",
        "html",
        "documentation",
        tuple(
            f"usr/share/doc/lilypond/html/Documentation/{manual}/*.html"
            for manual in ("learning", "essay", "notation", "usage", "web", "extending", "contributor")
        ),
        cap_mb=4,
        licence="GFDL-1.3+ (LilyPond's manuals)",
    ),
    Source(
        "libreoffice-help-en-us",
        "html",
        "documentation",
        ("usr/share/libreoffice/help/en-US/text/**/*.html",),
        cap_mb=3,
        licence="MPL-2.0",
    ),
    Source(
        "octave-doc",
        "html",
        "documentation",
        ("usr/share/doc/octave/octave.html/*.html",),
        cap_mb=2,
        licence="GPL-3+",
    ),
    Source(
        "exim4-doc-html",
        "html",
        "documentation",
        ("usr/share/doc/exim4-doc-html/spec_html/*.html",),
        cap_mb=2,
        licence="GPL-2+",
    ),
    Source(
        "postfix-doc",
        "html",
        "documentation",
        ("usr/share/doc/postfix/html/*.html",),
        (r"\.\d\.html$",),  # the manual pages: option lists in <pre>
        cap_mb=1.5,
        licence="IPL-1.0 or EPL-2.0",
    ),
    Source(
        "debian-reference-en",
        "html",
        "book",
        ("usr/share/debian-reference/*.en.html", "usr/share/doc/debian-reference-en/**/*.html"),
        licence="GPL-2+",
    ),
    Source(
        "developers-reference",
        "html",
        "book",
        ("usr/share/developers-reference/**/*.html", "usr/share/doc/developers-reference/**/*.html"),
        licence="GPL-2",
    ),
    Source(
        "debian-policy",
        "html",
        "documentation",
        ("usr/share/doc/debian-policy/**/*.html",),
        licence="GPL-2+",
    ),
    Source(
        "maint-guide",
        "html",
        "book",
        ("usr/share/doc/maint-guide/html/*.en.html", "usr/share/doc/maint-guide/html/index.en.html"),
        licence="GPL-2.0+ or MIT",
    ),
    Source(
        "bible-kjv-text",
        "bible",
        "book",
        ("usr/lib/bible.data",),
        licence="public domain (the King James text; the packaging GPL-2+)",
        helper_packages=("bible-kjv",),
    ),
    Source(
        "fortunes",
        "fortunes",
        "quotations",
        ("usr/share/games/fortunes/*",),
        (r"\.(dat|u8)$", r"/ascii-art$"),
        licence="BSD-4-clause-UC (fortune-mod); the quotations as collected",
    ),
    Source("dict-devil", "dictd", "dictionary", ("usr/share/dictd/*.index",), licence="public domain"),
    Source("dict-jargon", "dictd", "dictionary", ("usr/share/dictd/*.index",), licence="public domain"),
    Source("dict-gcide", "dictd", "dictionary", ("usr/share/dictd/*.index",), cap_mb=3, licence="GPL-3+ (GCIDE)"),
    Source(
        "wordnet-base",
        "wordnet",
        "dictionary",
        ("usr/share/wordnet/data.*",),
        cap_mb=2,
        licence="WordNet-3.0 (Princeton, permissive)",
    ),
)


# ----------------------------------------------------------------------------------------------------------------
# Text cleaning


@dataclass
class Document:
    source: str
    name: str  # unique within the source: the file's path, plus a part number where a file is split
    text: str

    @property
    def key(self) -> str:
        return f"{self.source}:{self.name}"


WORD = re.compile(r"[A-Za-z]+")


def is_prose(paragraph: str, min_words: int = 3) -> bool:
    """A paragraph of words, not code or a table row: enough words, mostly letters and spaces, no decode errors."""
    if "\ufffd" in paragraph or len(WORD.findall(paragraph)) < min_words:
        return False
    letters = sum(c.isalpha() or c == " " for c in paragraph)
    return letters >= 0.75 * len(paragraph)


def normalize_space(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace(DOCUMENT_SEPARATOR, " ")).strip()


def prose_paragraphs(paragraphs: Iterable[str], min_words: int = 3) -> list[str]:
    cleaned = (normalize_space(p) for p in paragraphs)
    return [p for p in cleaned if is_prose(p, min_words)]


# ----------------------------------------------------------------------------------------------------------------
# Readers: each turns the files of one extracted package into documents


BLOCK_TAGS = frozenset(
    "p div br li h1 h2 h3 h4 h5 h6 dt dd tr td th blockquote section article title hr ul ol dl caption figcaption "
    "main aside".split()
)
# Skipped with everything inside: code, scripts, navigation and tables (mostly data, not sentences).
SKIPPED_TAGS = frozenset(
    "script style pre head nav footer header noscript svg math table button form select textarea".split()
)
SKIPPED_CLASSES = frozenset(
    "related sphinxsidebar sphinxsidebarwrapper footer navheader navfooter toc breadcrumb breadcrumbs sidebar "
    "headerlink highlight linenos nav-chapters mobile-nav-chapters menu-bar toc-backref top up quickview "
    "page-header menu langs copyright admonition-title rst-versions wy-nav-side section-nav toctree-wrapper "
    "programlisting screen synopsis cmdsynopsis funcsynopsis literallayout example-contents docnav".split()
)
SKIPPED_IDS = frozenset(
    "sidebar menu-bar toc footer header quickview path page-header langs searchbox sidebar-scrollbox footnotes "
    "banner title".split()
)


class _TextOf(html.parser.HTMLParser):
    """The paragraphs of an HTML page's prose: block elements break paragraphs; skipped elements vanish whole."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._current: list[str] = []
        self._skip_tag: str | None = None
        self._skip_depth = 0

    def _break(self) -> None:
        if self._current:
            self.paragraphs.append("".join(self._current))
            self._current = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_tag:
            self._skip_depth += tag == self._skip_tag
            return
        attributes = dict(attrs)
        classes = set((attributes.get("class") or "").split())
        if tag in SKIPPED_TAGS or classes & SKIPPED_CLASSES or attributes.get("id") in SKIPPED_IDS:
            if tag not in ("br", "hr", "img", "input", "meta", "link"):  # void elements have no end tag
                self._skip_tag, self._skip_depth = tag, 1
            return
        if tag in BLOCK_TAGS:
            self._break()

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if tag in BLOCK_TAGS:
            self._break()

    def handle_data(self, data: str) -> None:
        if not self._skip_tag:
            self._current.append(data)

    def close(self) -> None:
        super().close()
        self._break()


def html_paragraphs(markup: str) -> list[str]:
    parser = _TextOf()
    parser.feed(markup)
    parser.close()
    return prose_paragraphs(parser.paragraphs)


def read_html(files: list[Path], root: Path, work: Path) -> Iterator[Document]:
    for file in files:
        raw = file.read_bytes()
        text = "\n\n".join(html_paragraphs(raw.decode("utf-8", errors="replace")))
        yield Document("", file.relative_to(root).as_posix(), text)


POD_CODE = re.compile(r"[A-Z]<<+\s(.*?)\s>>+|[A-Z]<([^<>]*)>", re.S)


def pod_inline(text: str) -> str:
    """POD formatting codes to their text (B<x>, C<< x >>, L<text|link>, E<gt>), innermost first."""

    def one(match: re.Match) -> str:
        code, inner = match.group(0)[0], match.group(1) if match.group(1) is not None else match.group(2)
        if code == "E":
            return {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}.get(inner, "")
        if code == "L":
            inner = inner.split("|", 1)[0] if "|" in inner else inner.split("/", 1)[0].strip('"') or inner
        return "" if code in ("X", "Z") else inner

    previous = None
    while previous != text:
        previous, text = text, POD_CODE.sub(one, text)
    return text


def pod_paragraphs(source: str) -> list[str]:
    """POD to prose paragraphs: commands give their heading text; verbatim (indented) blocks, code, are dropped."""
    out, skipping = [], False
    for block in re.split(r"\n\s*\n", source):
        if not block.strip():
            continue
        if block.startswith("="):
            command, _, rest = block[1:].partition(" ")
            command = command.strip()
            if command == "begin":
                skipping = True
            elif command == "end":
                skipping = False
            elif command.startswith("head") or command == "item":
                out.append(pod_inline(rest))
            continue
        if skipping or block[0] in " \t":
            continue
        out.append(pod_inline(block))
    return prose_paragraphs(out, min_words=2)


def read_pod(files: list[Path], root: Path, work: Path) -> Iterator[Document]:
    for file in files:
        text = "\n\n".join(pod_paragraphs(file.read_text(encoding="utf-8", errors="replace")))
        yield Document("", file.relative_to(root).as_posix(), text)


VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def kjv_documents(lines: Iterable[str]) -> Iterator[Document]:
    """``bible -f`` prints one verse a line after its reference (``Ge1:1 In the beginning ...``): one document a
    chapter, its verses run together as one paragraph."""
    chapter, verses = None, []
    for line in lines:
        match = VERSE.match(line.strip())
        if not match:
            continue
        book, number, _, verse = match.groups()
        if (book, number) != chapter and verses:
            yield Document("", f"{chapter[0]} {chapter[1]}", normalize_space(" ".join(verses)))
            verses = []
        chapter = (book, number)
        verses.append(verse)
    if verses:
        yield Document("", f"{chapter[0]} {chapter[1]}", normalize_space(" ".join(verses)))


def read_bible(files: list[Path], root: Path, work: Path) -> Iterator[Document]:
    """The text is compressed in bible-kjv's own format: its reader (the helper package bible-kjv) prints it."""
    reader = work / "bible-kjv" / "usr" / "bin" / "bible"
    data_dir = files[0].parent
    out = subprocess.run(
        [str(reader), "-p", str(data_dir), "-f", "gen1:1-rev22:21"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=True,
    ).stdout
    yield from kjv_documents(out.splitlines())


def read_fortunes(files: list[Path], root: Path, work: Path, per_document: int = 40) -> Iterator[Document]:
    """Fortune files hold quotations between lines of ``%``: documents of ``per_document`` quotations each."""
    for file in files:
        if not file.is_file() or file.is_symlink():
            continue
        quotes = [q.strip() for q in re.split(r"^%$", file.read_text(encoding="utf-8", errors="replace"), flags=re.M)]
        quotes = [q for q in quotes if q and is_prose(normalize_space(q), 2)]
        for part in range(0, len(quotes), per_document):
            text = "\n\n".join(quotes[part : part + per_document])
            yield Document("", f"{file.relative_to(root).as_posix()}#{part // per_document}", text)


DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
DICTD_SOURCE_TAG = re.compile(r"\[(?:\d{4} Webster|WordNet[^\]]*|PJC|Jargon[^\]]*|[A-Z]{2,5})[^\]]*\]")


def dictd_number(encoded: str) -> int:
    value = 0
    for char in encoded:
        value = value * 64 + DICTD_DIGITS.index(char)
    return value


def dictd_entries(index: str, data: bytes) -> Iterator[tuple[str, str]]:
    """(headword, entry text) of a dictd database, in index order, each entry once, the 00-database-* ones left
    out. An entry is re-wrapped: its lines joined, its source tags (``[1913 Webster]``) removed."""
    seen = set()
    for line in index.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        offset, length = dictd_number(parts[1]), dictd_number(parts[2])
        if offset in seen:
            continue
        seen.add(offset)
        entry = data[offset : offset + length].decode("utf-8", errors="replace")
        paragraphs = [normalize_space(DICTD_SOURCE_TAG.sub("", p)) for p in re.split(r"\n\s*\n", entry)]
        yield parts[0], "\n".join(p for p in paragraphs if p)


def read_dictd(files: list[Path], root: Path, work: Path, per_document: int = 60) -> Iterator[Document]:
    for index_file in files:
        data_file = index_file.with_suffix(".dict.dz")
        if not data_file.is_file():
            data_file = index_file.with_suffix(".dict")
        data = gzip.decompress(data_file.read_bytes()) if data_file.suffix == ".dz" else data_file.read_bytes()
        entries = [text for _, text in dictd_entries(index_file.read_text(encoding="utf-8", errors="replace"), data)]
        entries = [e for e in entries if "\ufffd" not in e and len(WORD.findall(e)) >= 3]
        for part in range(0, len(entries), per_document):
            text = "\n\n".join(entries[part : part + per_document])
            yield Document("", f"{index_file.relative_to(root).as_posix()}#{part // per_document}", text)


def wordnet_glosses(lines: Iterable[str]) -> Iterator[str]:
    """``words: gloss`` for each synset line of a WordNet data file (the licence header's lines start with spaces)."""
    for line in lines:
        if line.startswith(" ") or "|" not in line:
            continue
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        count = int(parts[3], 16)
        words = [parts[4 + 2 * i].replace("_", " ") for i in range(count)]
        words = [re.sub(r"\([a-z]+\)$", "", w) for w in words]
        yield f"{', '.join(words)}: {gloss.strip()}"


def read_wordnet(files: list[Path], root: Path, work: Path, per_document: int = 80) -> Iterator[Document]:
    for file in files:
        glosses = list(wordnet_glosses(file.read_text(encoding="utf-8", errors="replace").splitlines()))
        for part in range(0, len(glosses), per_document):
            text = "\n".join(glosses[part : part + per_document])
            yield Document("", f"{file.relative_to(root).as_posix()}#{part // per_document}", text)


Reader = Callable[[list[Path], Path, Path], Iterator[Document]]
READERS: dict[str, Reader] = {
    "html": read_html,
    "pod": read_pod,
    "bible": read_bible,
    "fortunes": read_fortunes,
    "dictd": read_dictd,
    "wordnet": read_wordnet,
}


# ----------------------------------------------------------------------------------------------------------------
# Packages: fetch, extract, read the licence


@dataclass
class Package:
    name: str
    version: str
    deb: str  # the .deb's file name
    deb_sha256: str
    root: Path  # where it is extracted


def fetch(package: str, debs: Path, work: Path) -> Package:
    """``apt-get download`` the package (kept in ``debs`` for the next run) and extract it under ``work``."""
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True, capture_output=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
    deb = found[-1]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True)
    root = work / package
    if not root.is_dir():
        partial = work / f".{package}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True)
        partial.rename(root)
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    return Package(package, version.stdout.strip(), deb.name, digest, root)


def copyright_licences(root: Path, package: str) -> str:
    """The licence of the ``Files: *`` stanza of a machine-readable copyright file (DEP-5), else ''."""
    path = root / "usr" / "share" / "doc" / package / "copyright"
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace")
    for stanza in re.split(r"\n\s*\n", text):
        if re.search(r"^Files:\s*\*\s*$", stanza, re.M):
            match = re.search(r"^License:\s*(.+)$", stanza, re.M)
            return match.group(1).strip() if match else ""
    return ""


# ----------------------------------------------------------------------------------------------------------------
# The corpus


@dataclass
class SourceStats:
    package: str
    version: str = ""
    deb: str = ""
    deb_sha256: str = ""
    kind: str = ""
    licence: str = ""
    copyright_files_star: str = ""
    files: int = 0
    documents: int = 0
    train_bytes: int = 0
    heldout_bytes: int = 0
    capped: bool = False
    helper_packages: dict[str, str] = field(default_factory=dict)


def source_files(source: Source, root: Path) -> list[Path]:
    files = {p for pattern in source.include for p in root.glob(pattern) if p.is_file()}
    return sorted(
        p for p in files if not any(re.search(rx, "/" + p.relative_to(root).as_posix()) for rx in source.exclude)
    )


def is_heldout(document: Document, per_mille: int = HELDOUT_PER_MILLE) -> bool:
    """Whether a document is held out: by a hash of its name, so the split never depends on what else is read."""
    digest = hashlib.sha256(document.key.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < per_mille


def read_source(source: Source, root: Path, work: Path) -> tuple[list[Document], int]:
    files = source_files(source, root)
    documents = []
    for document in READERS[source.reader](files, root, work):
        document.source = source.package
        documents.append(document)
    return documents, len(files)


def dedupe(documents: list[Document], boilerplate_repeats: int = 20) -> list[Document]:
    """Drop repeated paragraphs (a long one after its first time; a short one, navigation or a heading, everywhere
    once it repeats ``boilerplate_repeats`` times), then documents left empty or identical to an earlier one."""
    counts = Counter(p for d in documents for p in d.text.split("\n\n"))
    seen_paragraphs: set[str] = set()
    seen_documents: set[str] = set()
    out = []
    for document in documents:
        kept = []
        for paragraph in document.text.split("\n\n"):
            if len(paragraph) < 80:
                if counts[paragraph] >= boilerplate_repeats:
                    continue
            elif paragraph in seen_paragraphs:
                continue
            seen_paragraphs.add(paragraph)
            kept.append(paragraph)
        text = "\n\n".join(kept)
        digest = hashlib.sha256(text.encode()).hexdigest()
        if len(WORD.findall(text)) >= 20 and digest not in seen_documents:
            seen_documents.add(digest)
            out.append(Document(document.source, document.name, text))
    return out


def cap(documents: list[Document], cap_bytes: float | None, seed: int) -> tuple[list[Document], bool]:
    """A seeded random choice of whole documents up to ``cap_bytes`` of text (all of them without a cap)."""
    if cap_bytes is None or sum(len(d.text.encode()) for d in documents) <= cap_bytes:
        return documents, False
    order = list(documents)
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for document in order:
        size = len(document.text.encode())
        if total + size > cap_bytes:
            continue
        chosen.append(document)
        total += size
    keys = {d.key for d in chosen}
    return [d for d in documents if d.key in keys], True


def write_documents(documents: list[Document], path: Path, preset: int) -> None:
    text = f"\n{DOCUMENT_SEPARATOR}\n".join(d.text for d in documents) + "\n"
    path.write_bytes(lzma.compress(text.encode(), preset=preset))


def read_documents(path: Path) -> list[str]:
    """The documents of a ``train.txt.xz`` or ``heldout.txt.xz`` (what the pretraining reads)."""
    text = lzma.decompress(path.read_bytes()).decode()
    return [d.strip("\n") for d in text.split(f"\n{DOCUMENT_SEPARATOR}\n") if d.strip()]


def build(
    sources: Iterable[Source],
    packages: dict[str, Package],
    work: Path,
    out: Path,
    seed: int = 0,
    preset: int = 9 | lzma.PRESET_EXTREME,
    heldout_per_mille: int = HELDOUT_PER_MILLE,
) -> list[SourceStats]:
    """Read, clean, dedupe, cap and split every source, and write the corpus folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    all_documents: list[Document] = []
    stats: dict[str, SourceStats] = {}
    for source in sources:
        package = packages[source.package]
        start = time.perf_counter()
        documents, files = read_source(source, package.root, work)
        documents, capped = cap(dedupe(documents), source.cap_mb * MB if source.cap_mb else None, seed)
        stats[source.package] = SourceStats(
            package=source.package,
            version=package.version,
            deb=package.deb,
            deb_sha256=package.deb_sha256,
            kind=source.kind,
            licence=source.licence,
            copyright_files_star=copyright_licences(package.root, source.package),
            files=files,
            documents=len(documents),
            capped=capped,
            helper_packages={h: packages[h].version for h in source.helper_packages if h in packages},
        )
        size = sum(len(d.text.encode()) for d in documents) / MB
        print(
            f"{source.package}: {files} files, {len(documents)} documents, {size:.1f} MB"
            f"{' (capped)' if capped else ''}, {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        all_documents += documents
    all_documents = dedupe(all_documents)  # across packages too (one text shipped by two of them)
    random.Random(seed).shuffle(all_documents)  # a mix in any prefix (the tokenizer may train on one)
    train, heldout = [], []
    for document in all_documents:
        held = is_heldout(document, heldout_per_mille)
        (heldout if held else train).append(document)
        size = len(document.text.encode())
        if held:
            stats[document.source].heldout_bytes += size
        else:
            stats[document.source].train_bytes += size
    write_documents(train, out / "train.txt.xz", preset)
    write_documents(heldout, out / "heldout.txt.xz", preset)
    result = list(stats.values())
    (out / "sources.json").write_text(json.dumps([asdict(s) for s in result], indent=2) + "\n")
    (out / "SOURCES.md").write_text(sources_markdown(result, out, heldout_per_mille))
    return result


def sources_markdown(stats: list[SourceStats], out: Path, heldout_per_mille: int) -> str:
    train_total = sum(s.train_bytes for s in stats)
    lines = [
        "# The pretraining corpus",
        "",
        "Made by `benchmarks/corpus.py` from these Debian 12 (bookworm) packages, fetched with `apt-get download`.",
        f"`train.txt.xz`: {train_total / MB:.1f} MB of text ({(out / 'train.txt.xz').stat().st_size / MB:.1f} MB "
        f"as xz); `heldout.txt.xz`: {sum(s.heldout_bytes for s in stats) / MB:.2f} MB "
        f"({heldout_per_mille / 10:g} % of the documents, chosen by a hash of their names), never trained on.",
        "",
        "| package | version | kind | licence | copyright file's `Files: *` | files | documents | train MB | share "
        "| held-out kB | capped |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sorted(stats, key=lambda s: -s.train_bytes):
        helpers = "".join(f" (+ {h} {v})" for h, v in s.helper_packages.items())
        lines.append(
            f"| {s.package}{helpers} | {s.version} | {s.kind} | {s.licence} | {s.copyright_files_star or '-'} "
            f"| {s.files} | {s.documents} | {s.train_bytes / MB:.2f} | {s.train_bytes / max(train_total, 1):.1%} "
            f"| {s.heldout_bytes / 1000:.0f} | {'yes' if s.capped else 'no'} |"
        )
    kinds = Counter()
    for s in stats:
        kinds[s.kind] += s.train_bytes
    lines += ["", "By kind: " + ", ".join(f"{k} {v / max(train_total, 1):.0%}" for k, v in kinds.most_common()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".corpus", help="corpus folder to write")
    parser.add_argument("--work", type=Path, default=Path("/tmp/olivepress-corpus"), help="downloads and extracts")
    parser.add_argument("--only", default="", help="comma-separated packages (default: every source)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    chosen = [s for s in SOURCES if not args.only or s.package in args.only.split(",")]
    packages = {}
    for name in dict.fromkeys(p for s in chosen for p in (s.package, *s.helper_packages)):
        packages[name] = fetch(name, args.work / "debs", args.work / "x")
        print(f"fetched {name} {packages[name].version}", flush=True)
    for source in chosen:  # a package whose copyright file lives in a helper package (gimp-help-en)
        root = packages[source.package].root / "usr" / "share" / "doc" / source.package
        for helper in source.helper_packages:
            target = packages[helper].root / "usr" / "share" / "doc" / helper / "copyright"
            if root.is_symlink() and target.is_file():
                root.unlink()
                root.mkdir()
                shutil.copy2(target, root / "copyright")
    start = time.perf_counter()
    build(chosen, packages, args.work / "x", args.out, args.seed)
    print(f"corpus written to {args.out} in {time.perf_counter() - start:.0f} s")
    print((args.out / "SOURCES.md").read_text())


if __name__ == "__main__":
    main()
