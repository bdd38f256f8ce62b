"""The repository speaks of the product: no tracked text narrates how it was developed or
the environment it was developed in (that history, if kept, belongs in CHANGELOG.md)."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".md", ".py", ".json", ".sh", ".cfg", ".toml", ".txt"}
EXEMPT = {"CHANGELOG.md"}
NARRATIVE = re.compile("|".join([
    # (character classes keep this file from matching its own patterns)
    r"\.\./share[d]", r"\.git/info/exclud[e]", r"NOTES\.m[d]", r"\bsessio[n]s?\b", r"\bold [T]woTower\b", r"\bpredate[s]?\b",
    r"\brounds? of wor[k]\b", r"accuracy-run[s]", r"\blen[t] (?:a |no )?GPU\b", r"\bdevice machin[e]\b", r"\bsince replace[d]\b",
    r"\bsupersede[d]\b", r"\bfixed sinc[e]\b", r"\bthe issu[e]\b", r"\bissu[e]'s\b",
]), re.IGNORECASE)


def tracked_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file under the root
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [ROOT / n for n in names if Path(n).suffix in SUFFIXES and n not in EXEMPT and (ROOT / n).is_file()]


def test_no_tracked_text_narrates_development_history_or_environment():
    hits = []
    for file in tracked_files():
        for number, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if NARRATIVE.search(line):
                hits.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not hits, "history or environment narrated in tracked files:\n" + "\n".join(hits[:40])


def test_readme_is_short_and_self_contained():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    for link in re.findall(r"\]\(([^)#]+)\)", readme):  # every relative link resolves inside the repository
        if not re.match(r"[a-z]+://", link):
            assert (ROOT / link).exists(), link
