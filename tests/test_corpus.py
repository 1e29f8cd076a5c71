"""benchmarks/corpus.py: each reader on a small sample of its format, and a corpus built from fake packages."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from benchmarks import corpus

PAGE = """<html><head><title>Ignored title</title><script>var x = 1;</script></head><body>
<div class="related"><a href="a.html">previous</a> | <a href="b.html">next</a></div>
<h1>Installing the things<a class="headerlink" href="#x">¶</a></h1>
<p>The quick brown fox jumps over the lazy dog, and then it <code>returns</code> home
to rest for a while.</p>
<pre>for i in range(10):
    print(i)</pre>
<table><tr><td>cell one two three</td><td>cell four five six</td></tr></table>
<ul><li>A list item with several words in it.</li><li>x = y + 1; z()</li></ul>
<nav>Home About Contact Us Now</nav>
</body></html>"""


def test_html_keeps_prose_and_drops_code_navigation_and_tables():
    paragraphs = corpus.html_paragraphs(PAGE)
    assert paragraphs == [
        "Installing the things",
        "The quick brown fox jumps over the lazy dog, and then it returns home to rest for a while.",
        "A list item with several words in it.",
    ]


def test_pod_drops_verbatim_blocks_and_resolves_formatting_codes():
    pod = (
        "=head1 NAME\n\nperlfoo - what B<perlfoo> does\n\n"
        "=head2 Using it\n\nCall C<< foo($x) >> and read L<the manual|perlfunc/open> for E<lt>details>.\n\n"
        "    my $x = foo();\n    print $x;\n\n"
        "=begin html\n\n<p>skipped markup block</p>\n\n=end html\n\n"
        "=cut\n"
    )
    assert corpus.pod_paragraphs(pod) == [
        "perlfoo - what perlfoo does",
        "Using it",
        "Call foo($x) and read the manual for <details>.",
    ]


def test_kjv_chapters_become_documents():
    lines = ["Ge1:1 In the beginning God created.", "Ge1:2 And the earth was.", "Ge2:1 Thus the heavens."]
    documents = list(corpus.kjv_documents(lines))
    assert [(d.name, d.text) for d in documents] == [
        ("Ge 1", "In the beginning God created. And the earth was."),
        ("Ge 2", "Thus the heavens."),
    ]


def test_dictd_entries_follow_the_index():
    data = b"00-database-info\n  about\n\nword \\Word\\, n.\n   A unit of language. [1913 Webster]\n"
    start = data.index(b"word")
    encode = lambda n: "".join(corpus.DICTD_DIGITS[(n >> s) & 63] for s in (12, 6, 0)).lstrip("A") or "A"  # noqa: E731
    index = f"00-database-info\tA\t{encode(start)}\nword\t{encode(start)}\t{encode(len(data) - start)}\n"
    assert list(corpus.dictd_entries(index, data)) == [("word", "word \\Word\\, n. A unit of language.")]


def test_wordnet_glosses():
    lines = [
        "  1 This software and database is being provided",
        "00001740 03 n 02 entity 0 physical_entity 0 000 | that which is perceived to exist  ",
    ]
    assert list(corpus.wordnet_glosses(lines)) == ["entity, physical entity: that which is perceived to exist"]


def fake_package(root: Path, name: str, files: dict[str, str | bytes]) -> corpus.Package:
    for relative, content in files.items():
        path = root / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return corpus.Package(name, "1.0-1", f"{name}_1.0-1_all.deb", "0" * 64, root / name)


def prose(seed: int, paragraphs: int = 6) -> list[str]:
    """Sentences of real English (this repository's README), varied by ``seed``, so dedupe keeps them."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    sentences = [s.strip() for s in readme.replace("\n", " ").split(". ") if len(s.split()) > 6]
    return [f"Part {seed}.{i}: " + ". ".join(sentences[(seed * 7 + i * 3) % len(sentences) :][:3]) + "."
            for i in range(paragraphs)]  # fmt: skip


def sample_corpus(out: Path, work: Path, documents: int = 40, heldout_per_mille: int = 150) -> list:
    """A corpus built the real way from fake packages: HTML pages, POD files and fortunes."""
    pages = {
        f"usr/share/doc/python3.11/html/page{i}.html": "<html><body>"
        + "".join(f"<p>{p}</p>" for p in prose(i))
        + "<pre>code()</pre></body></html>"
        for i in range(documents)
    }
    pods = {f"usr/share/perl/5.36.0/pod/perl{i}.pod": "\n\n".join(prose(1000 + i)) + "\n" for i in range(3)}
    fortunes = {"usr/share/games/fortunes/wisdom": "\n%\n".join(prose(2000, 30)) + "\n%\n"}
    packages = {
        "python3.11-doc": fake_package(work, "python3.11-doc", pages),
        "perl-doc": fake_package(work, "perl-doc", pods),
        "fortunes": fake_package(work, "fortunes", fortunes),
    }
    sources = [s for s in corpus.SOURCES if s.package in packages]
    return corpus.build(sources, packages, work, out, preset=1, heldout_per_mille=heldout_per_mille)


def test_build_writes_train_heldout_and_sources(tmp_path):
    stats = sample_corpus(tmp_path / "corpus", tmp_path / "x")
    train = corpus.read_documents(tmp_path / "corpus" / "train.txt.xz")
    heldout = corpus.read_documents(tmp_path / "corpus" / "heldout.txt.xz")
    assert train and heldout and not set(train) & set(heldout)
    assert all("code()" not in d and corpus.DOCUMENT_SEPARATOR not in d for d in train + heldout)
    by_package = {s.package: s for s in stats}
    assert set(by_package) == {"python3.11-doc", "perl-doc", "fortunes"}
    assert by_package["python3.11-doc"].version == "1.0-1" and by_package["python3.11-doc"].documents == 40
    assert sum(s.train_bytes for s in stats) == sum(len(d.encode()) for d in train)
    recorded = json.loads((tmp_path / "corpus" / "sources.json").read_text())
    assert {r["package"] for r in recorded} == set(by_package)
    assert "| perl-doc | 1.0-1 |" in (tmp_path / "corpus" / "SOURCES.md").read_text()


def test_dedupe_drops_repeated_paragraphs_and_documents():
    long = "This paragraph is long enough to count as real content and it repeats across pages. " * 2
    docs = [
        corpus.Document(
            "p",
            "a",
            f"{long}\n\nFirst page has its own words here, twenty of them at least, so it stays "
            "in the corpus as a document of its own right.",
        ),  # fmt: skip
        corpus.Document(
            "p",
            "b",
            f"{long}\n\nSecond page has other words, twenty of them at least, so it stays in "
            "the corpus as a document of its own right.",
        ),  # fmt: skip
        corpus.Document(
            "p",
            "c",
            f"{long}\n\nSecond page has other words, twenty of them at least, so it stays in "
            "the corpus as a document of its own right.",
        ),  # fmt: skip
    ]
    kept = corpus.dedupe(docs)
    assert [d.name for d in kept] == ["a", "b"]
    assert long.strip() in kept[0].text and long.strip() not in kept[1].text


def test_dictd_file_reader(tmp_path):
    data = b'alpha \\Al"pha\\, n.\n   The first letter of the Greek alphabet, called alpha.\n'
    (tmp_path / "usr/share/dictd").mkdir(parents=True)
    (tmp_path / "usr/share/dictd/test.dict.dz").write_bytes(gzip.compress(data))
    (tmp_path / "usr/share/dictd/test.index").write_text(f"alpha\tA\t{corpus.DICTD_DIGITS[len(data) // 64]}"
                                                         f"{corpus.DICTD_DIGITS[len(data) % 64]}\n")  # fmt: skip
    documents = list(corpus.read_dictd(sorted((tmp_path / "usr/share/dictd").glob("*.index")), tmp_path, tmp_path))
    assert len(documents) == 1 and documents[0].text.startswith('alpha \\Al"pha\\, n. The first letter')
