"""Documentation promises: references resolve inside the repository, the corpus is named for what it
is, a CPU-only install is explained, the logged loss is explained, --help shows defaults."""
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tracked(*patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / f for f in out.split() if not f.startswith(("tests/data/", "benchmarks/results/"))]


def test_references_resolve_inside_the_repository():
    files = tracked("*.py", "*.md", "*.sh", "*.ini")
    assert len(files) > 30
    design = (REPO / "DESIGN.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\.", design, flags=re.M)}
    repo_names = {Path(f).name for f in subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                                       check=True).stdout.split()}
    bad = []
    for f in files:
        if f.name == "test_docs.py":                    # names the outside files it looks for
            continue
        text = f.read_text()
        if "SPEC.md" in text or re.search(r"\bSPEC (section|\d)", text) or "/work/" in text:
            bad.append(f"{f.relative_to(REPO)}: cites a file outside the repository")
        for a, b in re.findall(r"DESIGN\.md sections? (\d+)(?:-(\d+))?", text):
            for n in range(int(a), int(b or a) + 1):
                if n not in sections:
                    bad.append(f"{f.relative_to(REPO)}: DESIGN.md section {n} does not exist")
        for name in set(re.findall(r"\b([A-Z][A-Z_]+\.md)\b", text)):
            if name not in repo_names:
                bad.append(f"{f.relative_to(REPO)}: {name} is not in the repository")
    assert not bad, "\n".join(bad)


def test_readme_names_the_corpus_and_explains_cpu_installs_and_the_loss():
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "MATH train split" not in readme and "MATH train text" not in readme
    assert "**MATH test set**" in readme and "not** for evaluating MATH accuracy" in readme
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert "https://download.pytorch.org/whl/cpu" in (REPO / "scripts" / "setup.sh").read_text()
    assert "beta_base*NLL_base + beta_talk*NLL_talk + beta_policy*policy" in readme
    assert "a total of 40 next to NLLs of 2 is expected" in readme
    for flag in ("--eval-data", "--eval-every", "--keep-last", "--thoughts-every", "--overwrite", "--debug"):
        assert flag in readme, flag
    data_doc = (REPO / "quietstar" / "config.py").read_text()
    assert "MATH *test* set" in data_doc


def test_readme_using_a_trained_model_snippets_run(tiny_export):
    """The README's Python blocks of "Using a trained model" run as written, on a tiny export."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Using a trained model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2 and "runs/x/export" in blocks[0]
    exp = tiny_export(P=1)
    ns: dict = {}
    exec("\n".join(blocks).replace("runs/x/export", str(exp)), ns)
    B, n = ns["ids"].shape
    assert ns["logits"].shape[:2] == (B, n) and ns["out"].shape[0] == B
    assert ns["tokens"].shape == (B, 32) and ns["thoughts"].shape[:3] == (B, 32, 1)
