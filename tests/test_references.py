"""Every name the repository cites must resolve.

The repository's text (source, docs, configs, the CI script) cites files, sections of the
docs, steps of ``docs/method.md`` and ``ctt.`` objects by name. A citation that points
nowhere is a broken promise to the reader, so each kind is checked here:

- repository paths (``ctt/step.py``, ``benchmarks/results/step.json``, ``tests/x.py::test_y``)
  exist; globs must match something, ``{a,b}`` is expanded, ``<placeholder>`` paths are skipped;
- bare file names (``method.md``) name a file somewhere in the repository, unless they are
  the name of a file that runs and studies write (:data:`RUNTIME_NAMES`); a Markdown file
  under another directory (``design/notes.md``) must exist;
- ``file.md#anchor`` (and Markdown links) match a heading of that file, by GitHub's anchor
  rules; Markdown links resolve relative to the file that holds them, as GitHub does; a
  section cited by its quoted title (``README "Layout"``) is a heading of that file;
- "method.md step N" names a ``## Step N: ...`` section of ``docs/method.md``;
- dotted ``ctt.`` names import and resolve attribute by attribute;
- every path in README's Layout section exists;
- nothing cites the design notes kept outside the repository (the sibling ``shared`` folder).

The checker is plain functions over a :class:`Repo` (file paths and texts), so
:func:`test_the_checker_reports_each_kind_of_broken_reference` runs it on a small tree built
in memory and proves that each check can fail.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import posixpath
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This file holds deliberately broken citations as fixtures of the negative test.
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()

TEXT_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".sh")
TEXT_FILES = (".ci/run",)
METHOD_DOC = "docs/method.md"
README = "README.md"

# Bare file names that name what a run, a study or a benchmark writes, not a file of this
# repository. Anything else cited by its bare name must exist somewhere in the repository.
RUNTIME_NAMES = frozenset({
    "report.md",           # a study's Markdown report (ctt.tune.report)
    "study.json",          # a study's definition, command, versions and outcome
    "trial.json",          # one trial's record, trials/<id>/trial.json
    "config.json",         # a single run's resolved config (ctt.train)
    "warmup.json",         # the shared warm-ups a study has published, by seed
    "warmup-failed.json",  # the shared warm-up that failed for good
    "confirm.json",        # a sweep's confirmation summary
    "plan.json",           # a study's questions, rounds of seeds and spend (ctt.tune.adaptive)
})

# Suffixes of bare file names checked in Markdown prose. Elsewhere only ``.md`` names are: in
# code, ``args.json`` is an attribute and tests name the fixture files they write.
BARE_SUFFIXES = ("md", "py", "json", "yaml", "yml", "toml")

# Repository paths cited as examples of files a user writes.
EXAMPLE_PATHS = frozenset({
    "studies/my_ablation.py",  # ctt/tune/cli.py: how a new study file looks
    # an ablation's questions (a/b: variant a - variant b) whose first variant is `ctt`
    "ctt/cross", "ctt/supervised",
})


# --- the repository as texts ---------------------------------------------------------------

@dataclass
class Repo:
    """The files of a repository: every path (text or not), and the texts that are scanned."""

    paths: set[str]
    texts: dict[str, str]
    dirs: set[str] = field(init=False)
    _anchors: dict[str, frozenset[str]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.dirs = {posixpath.dirname(p) for p in self.paths}
        for d in list(self.dirs):
            while d:
                self.dirs.add(d)
                d = posixpath.dirname(d)
        self.dirs.discard("")

    @functools.cached_property
    def basenames(self) -> set[str]:
        return {posixpath.basename(p) for p in self.paths}

    @functools.cached_property
    def top_dirs(self) -> list[str]:
        return sorted({p.split("/", 1)[0] for p in self.paths if "/" in p})

    def exists(self, path: str) -> bool:
        path = path.rstrip("/")
        if any(c in path for c in "*?["):
            return any(fnmatch.fnmatchcase(p, path) for p in self.paths | self.dirs)
        return path in self.paths or path in self.dirs

    def anchors(self, path: str) -> frozenset[str]:
        if path not in self._anchors:
            self._anchors[path] = frozenset(heading_anchors(self.texts.get(path, "")))
        return self._anchors[path]


def repo_files(root: Path = ROOT) -> list[str]:
    """Tracked files and new files git does not ignore (docs being written count), minus those
    deleted from the working tree."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    return sorted({p for p in out.splitlines() if (root / p).is_file()})


def is_text(path: str) -> bool:
    return path.endswith(TEXT_SUFFIXES) or path in TEXT_FILES


def load_repo(root: Path = ROOT) -> Repo:
    paths = set(repo_files(root))
    texts = {p: (root / p).read_text(encoding="utf-8") for p in sorted(paths)
             if is_text(p) and p != SELF}
    return Repo(paths, texts)


# --- Markdown: headings and anchors --------------------------------------------------------

FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a Markdown text outside fenced code blocks."""
    fenced = False
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield no, line


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: link syntax reduced to its text, lower case,
    punctuation other than ``-`` and ``_`` dropped, each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def heading_anchors(text: str) -> list[str]:
    """Anchors of a Markdown text's headings, with GitHub's ``-1``, ``-2`` for repeats."""
    seen: dict[str, int] = {}
    out = []
    for _, line in prose_lines(text):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = github_anchor(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append(base if n == 0 else f"{base}-{n}")
    return out


def method_steps(text: str) -> set[int]:
    """Step numbers of ``## Step N: ...`` headings."""
    return {int(m.group(1)) for _, line in prose_lines(text)
            if (m := re.match(r"#{2,6}\s+Step\s+(\d+)\b", line))}


# --- finding citations ---------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    name: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.name}: {self.why}"


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


MD_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"\n]*\")?\)")


def _without_link_targets(path: str, text: str) -> str:
    """A Markdown text with its link targets blanked (they are checked relative to the file,
    by :func:`check_markdown_links`); other texts as they are. Offsets are kept."""
    if not path.endswith(".md"):
        return text
    return MD_LINK.sub(lambda m: m.group(0).replace(m.group(1), " " * len(m.group(1))), text)


def _path_pattern(repo: Repo) -> re.Pattern[str]:
    tops = "|".join(re.escape(d) for d in repo.top_dirs)
    # a path: segments of name characters, glob characters, <placeholders> or {a,b} groups
    return re.compile(rf"(?<![\w./~$@-])(?:{tops})/(?:[\w.*?<>/-]|\{{[^{{}}\s]*\}})*")


def _expand_braces(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [x for alt in m.group(1).split(",")
            for x in _expand_braces(path[:m.start()] + alt + path[m.end():])]


def repo_path_citations(repo: Repo) -> Iterator[tuple[str, int, str, str]]:
    """``(file, line, path, rest of the line)`` for every repository path cited in plain text
    (code, comments, backticks; Markdown link targets excepted)."""
    pattern = _path_pattern(repo)
    for path, text in repo.texts.items():
        text = _without_link_targets(path, text)
        for m in pattern.finditer(text):
            yield path, _line_of(text, m.start()), m.group(0).rstrip("."), text[m.end():]


def _looks_like_a_file_or_dir(path: str) -> bool:
    return path.endswith("/") or bool(re.search(r"\.\w+$", path))


def check_repo_paths(repo: Repo) -> list[Problem]:
    """Cited repository paths exist. Outside Markdown, a missing name with neither a suffix nor
    a trailing ``/`` is not a citation (``ctt/0`` is a variant and seed, ``s3://ctt/...`` a
    bucket)."""
    problems = []
    for file, line, cited, after in repo_path_citations(repo):
        if "<" in cited or ">" in cited:
            continue  # a placeholder such as tests/test_<module>.py
        if re.search(r"\{[^{},]*\}", cited):
            continue  # a format field such as ctt/{name}.py
        if cited in EXAMPLE_PATHS:
            continue
        missing = [p for p in _expand_braces(cited) if not repo.exists(p)]
        if not file.endswith(".md"):
            missing = [p for p in missing if _looks_like_a_file_or_dir(p)]
        if missing:
            problems.append(Problem(file, line, cited, f"no such path {', '.join(missing)}"))
            continue
        test = re.match(r"::(\w+)", after)
        if test and cited.endswith(".py") and cited in repo.texts:
            if not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{test.group(1)}\b",
                             repo.texts[cited], re.M):
                problems.append(Problem(file, line, f"{cited}::{test.group(1)}",
                                        f"no function or class {test.group(1)} there"))
    return problems


def _bare_name(suffixes: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(
        rf"(?<![\w/.$%~-])([\w-]+(?:\.[\w-]+)*\.(?:{'|'.join(suffixes)}))(?![\w/-])")


BARE_NAME_MD = _bare_name(BARE_SUFFIXES)
BARE_NAME = _bare_name(("md",))


# A Markdown file cited with a directory that is not a top-level directory of the repository
# (``design/notes.md``): it must exist relative to the repository or to the citing file.
OTHER_MD_PATH = re.compile(r"(?<![\w/.~:$%-])((?:[\w.-]+/)+[\w.-]+\.md)(?![\w/-])")


def check_bare_names(repo: Repo) -> list[Problem]:
    """File names cited without their directory must name some file of the repository, and a
    Markdown file cited under another directory must exist."""
    problems = []
    for path, text in repo.texts.items():
        text = _without_link_targets(path, text)
        pattern = BARE_NAME_MD if path.endswith(".md") else BARE_NAME
        for m in pattern.finditer(text):
            name = m.group(1)
            if name in RUNTIME_NAMES or name in repo.basenames:
                continue
            problems.append(Problem(path, _line_of(text, m.start()), name,
                                    "no file of that name in the repository"))
        for m in OTHER_MD_PATH.finditer(text):
            cited = m.group(1)
            if cited.split("/", 1)[0] in repo.top_dirs or \
                    posixpath.basename(cited) in RUNTIME_NAMES:
                continue  # a repository path (check_repo_paths) or a study's report
            here = posixpath.normpath(posixpath.join(posixpath.dirname(path), cited))
            if not (repo.exists(cited) or repo.exists(here)):
                problems.append(Problem(path, _line_of(text, m.start()), cited,
                                        "no such Markdown file in the repository"))
    return problems


def _anchor_problem(repo: Repo, target: str, anchor: str) -> str | None:
    if target not in repo.texts:
        return None if not target.endswith(".md") else f"no Markdown file {target}"
    if anchor not in repo.anchors(target):
        return f"{target} has no heading with anchor #{anchor}"
    return None


def check_markdown_links(repo: Repo) -> list[Problem]:
    """Markdown links and images: the target (relative to the file) exists, and its anchor
    matches a heading of the target."""
    problems = []
    for path, text in repo.texts.items():
        if not path.endswith(".md"):
            continue
        lines = dict(prose_lines(text))
        for m in MD_LINK.finditer(text):
            line = _line_of(text, m.start())
            if line not in lines:
                continue  # inside a code block
            link = m.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", link):
                continue  # http:, https:, mailto:
            target, _, anchor = link.partition("#")
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target)) \
                if target else path
            if resolved.startswith("../") or resolved == "..":
                problems.append(Problem(path, line, link, "points outside the repository"))
                continue
            if not repo.exists(resolved):
                problems.append(Problem(path, line, link, f"no such path {resolved}"))
                continue
            if anchor and (why := _anchor_problem(repo, resolved, anchor)):
                problems.append(Problem(path, line, link, why))
    return problems


MD_ANCHOR = re.compile(r"(?<![\w/.#-])((?:[\w-]+/)*[\w.-]+\.md)#([\w-]+)")


def _md_by_name(repo: Repo, cited: str) -> str | None:
    """The repository file a cited ``x.md`` means: a repository path as it is, README.md the
    top-level one, another bare name the one file of that name (None when there is none or
    several)."""
    if "/" in cited or cited == README:
        return cited
    found = [p for p in repo.texts if posixpath.basename(p) == cited]
    return found[0] if len(found) == 1 else None


def check_anchors(repo: Repo) -> list[Problem]:
    """``x.md#anchor`` cited in plain text (code comments, backticks, YAML)."""
    problems = []
    for path, text in repo.texts.items():
        text = _without_link_targets(path, text)
        for m in MD_ANCHOR.finditer(text):
            target = _md_by_name(repo, m.group(1))
            if target is None:
                continue  # a missing bare name is check_bare_names' report
            if why := _anchor_problem(repo, target, m.group(2)):
                problems.append(Problem(path, _line_of(text, m.start()), m.group(0), why))
    return problems


# A section cited by its title: README "Pruning, replayed", docs/studies.md, "Resume".
SECTION_CITATION = re.compile(
    r"(?<![\w/.#-])(README(?:\.md)?|(?:[\w-]+/)*[\w.-]+\.md)\)?,?:?\s+(?:section\s+)?"
    r"[\"'\u201c]([^\"'\u201d\n]{3,80})[\"'\u201d]")


def check_section_titles(repo: Repo) -> list[Problem]:
    """A section cited by its quoted title exists in that file (compared by anchor)."""
    problems = []
    for path, text in repo.texts.items():
        for m in SECTION_CITATION.finditer(text):
            cited = README if m.group(1) == "README" else m.group(1)
            if posixpath.basename(cited) in RUNTIME_NAMES:
                continue
            target = _md_by_name(repo, cited)
            if target is None or target not in repo.texts:
                continue  # a missing file is check_bare_names' or check_repo_paths' report
            if github_anchor(m.group(2)) not in repo.anchors(target):
                problems.append(Problem(path, _line_of(text, m.start()), m.group(0),
                                        f"{target} has no section titled {m.group(2)!r}"))
    return problems


STEP_CITATION = re.compile(
    r"method\.md(?:#[\w-]+)?[\"')\]]*[\s,;:(]*(?:\"[^\"\n]*\"[\s,;:]*)?[Ss]teps?\s+"
    r"(\d+(?:\s*(?:-|–|,|and|to)\s*\d+)*)")


def check_method_steps(repo: Repo) -> list[Problem]:
    """"method.md step N" (or "steps N-M", "steps N and M") names a step of docs/method.md."""
    steps = method_steps(repo.texts.get(METHOD_DOC, ""))
    problems = []
    for path, text in repo.texts.items():
        for m in STEP_CITATION.finditer(text):
            numbers = [int(n) for n in re.findall(r"\d+", m.group(1))]
            if re.search(r"-|–|to", m.group(1)) and len(numbers) == 2:
                numbers = list(range(numbers[0], numbers[1] + 1))
            missing = [n for n in numbers if n not in steps]
            if missing:
                problems.append(Problem(path, _line_of(text, m.start()), m.group(0),
                                        f"{METHOD_DOC} has no section for step "
                                        f"{', '.join(map(str, missing))}"))
    return problems


DOTTED = re.compile(r"(?<![\w.])ctt(?:\.[A-Za-z_]\w*)+")


@functools.cache
def _import(module: str) -> object:
    return importlib.import_module(module)


@functools.cache
def resolve_dotted(name: str) -> str | None:
    """None if ``name`` is an importable module or an attribute path below one, else why not."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = _import(module)
        except ModuleNotFoundError as e:
            if e.name and (module == e.name or module.startswith(e.name + ".")):
                continue  # not a module: try the next shorter prefix
            return f"importing {module} fails: {e}"
        except Exception as e:  # an import-time error is a broken reference too
            return f"importing {module} fails: {type(e).__name__}: {e}"
        for j, attr in enumerate(parts[i:], i):
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                return f"no module or attribute {'.'.join(parts[:j + 1])}"
        return None
    return "no such module"


def check_dotted_names(repo: Repo,
                       resolve: Callable[[str], str | None] = resolve_dotted) -> list[Problem]:
    problems = []
    for path, text in repo.texts.items():
        for m in DOTTED.finditer(text):
            if why := resolve(m.group(0)):
                problems.append(Problem(path, _line_of(text, m.start()), m.group(0), why))
    return problems


def layout_paths(readme: str) -> list[tuple[int, str]]:
    """``(line, path)`` listed in README's Layout section: the first word of each code-block
    line and every backticked word with a ``/`` in it."""
    lines = readme.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"##\s+Layout\s*$", line)),
                 None)
    if start is None:
        return []
    out: list[tuple[int, str]] = []
    fenced = False
    for no in range(start + 1, len(lines)):
        line = lines[no]
        if re.match(r"#{1,2}\s", line) and not fenced:
            break
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            if line.strip():
                out.append((no + 1, line.split()[0]))
            continue
        for word in re.findall(r"`([^`\s]+)`", line):
            if "/" in word and not re.match(r"[a-z]+://", word):
                out.append((no + 1, word))
    return out


def check_layout(repo: Repo) -> list[Problem]:
    readme = repo.texts.get(README, "")
    problems = []
    if not layout_paths(readme):
        problems.append(Problem(README, 1, "## Layout", "no Layout section listing paths"))
    for line, cited in layout_paths(readme):
        missing = [p for p in _expand_braces(cited) if not repo.exists(p)]
        if missing:
            problems.append(Problem(README, line, cited, "listed in Layout, does not exist"))
    return problems


# a path outside the repository, spelled in pieces so this file does not cite it itself
OUTSIDE_NOTE = "../" + "shared" + "/design/method.md"
OUTSIDE = re.compile(r"(?:\.\./)+shared\b|\bshared" + r"/design\b")


def check_no_outside_citations(repo: Repo) -> list[Problem]:
    """The design notes beside the checkout are not part of the repository: never cite them."""
    return [Problem(path, _line_of(text, m.start()), m.group(0),
                    "cites a file outside the repository")
            for path, text in repo.texts.items() for m in OUTSIDE.finditer(text)]


def check_code_fences(repo: Repo) -> list[Problem]:
    """Markdown code fences pair up: an opening fence (with or without a language) closed by a
    bare one. A doubled opening line (```bash twice) renders the rest of the page wrongly."""
    problems = []
    for path, text in repo.texts.items():
        if not path.endswith(".md"):
            continue
        opened = 0
        for n, line in enumerate(text.splitlines(), 1):
            m = re.match(r"^\s*(```|~~~)(.*)$", line)
            if not m:
                continue
            if opened and m.group(2).strip():
                problems.append(Problem(path, n, line.strip(),
                                        f"a fence opened on line {opened} is not closed"))
            opened = 0 if opened else n
        if opened:
            problems.append(Problem(path, opened, "```", "fence never closed"))
    return problems


CHECKS: dict[str, Callable[[Repo], list[Problem]]] = {
    "paths": check_repo_paths,
    "bare names": check_bare_names,
    "markdown links": check_markdown_links,
    "anchors": check_anchors,
    "section titles": check_section_titles,
    "method steps": check_method_steps,
    "ctt names": check_dotted_names,
    "layout": check_layout,
    "outside": check_no_outside_citations,
    "code fences": check_code_fences,
}


def all_problems(repo: Repo) -> list[Problem]:
    return [p for check in CHECKS.values() for p in check(repo)]


# --- the repository ------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _repo() -> Repo:
    return load_repo()


def _assert_none(problems: list[Problem]) -> None:
    assert not problems, "broken references:\n" + "\n".join(map(str, problems))


def test_cited_repository_paths_exist() -> None:
    _assert_none(check_repo_paths(_repo()))


def test_bare_file_names_name_repository_files() -> None:
    _assert_none(check_bare_names(_repo()))


def test_markdown_links_resolve() -> None:
    _assert_none(check_markdown_links(_repo()))


def test_cited_anchors_match_headings() -> None:
    _assert_none(check_anchors(_repo()))


def test_cited_section_titles_exist() -> None:
    _assert_none(check_section_titles(_repo()))


def test_cited_method_steps_exist() -> None:
    repo = _repo()
    assert method_steps(repo.texts[METHOD_DOC]), f"{METHOD_DOC} has no '## Step N: ...' section"
    _assert_none(check_method_steps(repo))


def test_cited_ctt_names_resolve() -> None:
    _assert_none(check_dotted_names(_repo()))


def test_readme_layout_lists_existing_paths() -> None:
    _assert_none(check_layout(_repo()))


def test_nothing_cites_files_outside_the_repository() -> None:
    _assert_none(check_no_outside_citations(_repo()))


def test_markdown_code_fences_pair_up() -> None:
    _assert_none(check_code_fences(_repo()))
    bad = _tree({"docs/x.md": "# X\n\n```bash\n```bash\nls\n```\n```\n\n```\nopen\n"})
    assert [(p.line, p.why) for p in check_code_fences(bad)] == [
        (4, "a fence opened on line 3 is not closed"), (9, "fence never closed")]


# --- the checker itself --------------------------------------------------------------------

def test_github_anchor_rules() -> None:
    assert github_anchor("Step 3: Cross-teacher loss") == "step-3-cross-teacher-loss"
    assert github_anchor("Sweeps: pruning, Optuna's record and `best`") == \
        "sweeps-pruning-optunas-record-and-best"
    assert github_anchor("[Data](docs/data.md) layouts") == "data-layouts"
    assert heading_anchors("# A\n```\n# not a heading\n```\n## A\n## B_c\n") == \
        ["a", "a-1", "b_c"]


def _tree(files: dict[str, str], extra_paths: tuple[str, ...] = ()) -> Repo:
    return Repo(set(files) | set(extra_paths), dict(files))


GOOD_METHOD = "# Method\n\n## Step 1: Label\n\n## Step 2: Mix\n"


def test_the_checker_accepts_valid_references() -> None:
    repo = _tree({
        README: ("# T\n\n[method](docs/method.md#step-2-mix), `docs/method.md`, "
                 "`benchmarks/results/*.json`, `studies/{a,b}.py`, `tests/test_<module>.py`\n\n"
                 "## Layout\n\n```\nctt/config.py   the config\ndocs/\n```\n\n## More\n\n"
                 "[tour](#t), `report.md`\n"),
        METHOD_DOC: GOOD_METHOD + "\nBack to [the layout](../README.md#layout).\n",
        "ctt/config.py": ('"""ctt.config.VARIANTS (docs/method.md, step 1; docs/method.md '
                          'steps 1-2; method.md step 2; docs/method.md#step-1-label;\n'
                          'README "Layout"; studies_out/x/report.md)."""\n'),
        "studies/a.py": "", "studies/b.py": "",
        "tests/test_x.py": "# tests/test_x.py::test_y\ndef test_y():\n    pass\n",
    }, extra_paths=("benchmarks/results/step.json",))
    assert all_problems(repo) == []


def test_the_checker_reports_each_kind_of_broken_reference() -> None:
    repo = _tree({
        README: ("# T\n\nSee [method](docs/method.md#no-such-heading), "
                 "[notes](" + OUTSIDE_NOTE + ") and `docs/missing.md`.\n\n"
                 "## Layout\n\n```\nctt/gone.py   was here\n```\n"),
        METHOD_DOC: GOOD_METHOD,
        "ctt/config.py": ('"""ctt.config.NO_SUCH_NAME and ctt.nowhere (docs/method.md, '
                          'step 7), as architecture.md says; docs/method.md#step-9-ema;\n'
                          'tests/test_x.py::test_gone; design/notes.md; README "Lost".\n"""\n'),
        "tests/test_x.py": "def test_y():\n    pass\n",
    })
    found = {(p.file, p.name) for p in all_problems(repo)}
    expected = {
        (README, "docs/method.md#no-such-heading"),     # anchor of a link
        (README, OUTSIDE_NOTE),         # link outside the repository
        (README, "../shared"),                          # the design notes, cited
        (README, "docs/missing.md"),                    # path
        (README, "ctt/gone.py"),                        # path, and a Layout entry
        ("ctt/config.py", "ctt.config.NO_SUCH_NAME"),   # attribute of a module
        ("ctt/config.py", "ctt.nowhere"),               # module
        ("ctt/config.py", "method.md, step 7"),         # method step
        ("ctt/config.py", "architecture.md"),           # bare name of no repository file
        ("ctt/config.py", "docs/method.md#step-9-ema"),  # anchor in plain text
        ("ctt/config.py", "tests/test_x.py::test_gone"),  # test function
        ("ctt/config.py", "design/notes.md"),           # a Markdown file under no repo dir
        ("ctt/config.py", 'README "Lost"'),             # a section cited by its title
    }
    assert expected <= found, sorted(expected - found)
    layout = [p for p in check_layout(repo) if p.name == "ctt/gone.py"]
    assert layout and layout[0].why == "listed in Layout, does not exist"
