"""Every number in a table of README.md and docs/*.md comes from a committed results file.

A table that holds measured numbers names its file on a line right below it (or, failing that,
right above it): `Source: experiments/results/<file>` (several paths may follow, separated by
commas; `key=value` words after a JSON file's path narrow it to the objects holding those
entries, e.g. `model=smollm2-135m set=bank-b`). Each number of each numeric cell (a body cell that starts with a digit, a sign or a
decimal point) must occur in that file: for a JSON file, among every number it holds (strings
such as "27/30" included), for a .md or .csv file, among the numbers of its text; a file's
number matches when it rounds to the number printed, at the precision printed ("0.832" matches
0.8318, "83%" or "83.2%" a stored 0.832 or 83.2, "[5.2, 7.8%]" is two percentages, "1,000" is
1000). A table with numeric cells and no Source line fails, unless it is on the allowlist of
tables that measure nothing (options, model shapes, published constants).

Tables inside fenced code blocks (```) are program output shown as text, not tables.
"""

from __future__ import annotations

import bisect
import json
import re
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# (page, first header line) -> why the table's numbers are not measurements
NOT_MEASURED = {
    ("docs/models.md", "| name | model | architecture | layers x heads (kv) | source |"): (
        "the catalogue: each model's shape from its config and its download size, not a result"
    ),
    ("docs/beyond-niah.md", "| set | what | trials |"): (
        "the evaluation sets' design: how many questions, lengths and depths each is built from"
    ),
}

NUMBER = re.compile(r"(?<![\w.])(-?)(\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(\.\d+)?([eE][-+]?\d{1,3}(?![\w.]))?(%?)")
PERCENT_GROUP = re.compile(r"\[[^\]]*%\]")
SOURCE = re.compile(r"^Source:\s*(.+)$")
SOURCE_PATH = re.compile(r"experiments/results/[\w./-]*[\w]")
SELECT = re.compile(r"(?<![\w/.-])([A-Za-z_][\w-]*)=([^\s,;]+)")


@dataclass(frozen=True)
class Number:
    text: str  # as printed
    value: Decimal  # the number printed, a percentage as printed (83 for "83%")
    quantum: Decimal  # its last printed digit's place: 0.001 for "0.832", 1 for "83%"
    percent: bool


@dataclass
class Table:
    page: str  # relative to the repository root
    line: int  # 1-based line of the header
    header: str
    rows: list[list[str]]
    start: int = 0  # 0-based line of the header
    end: int = 0  # 0-based line after the last row
    sources: list[str] | None = None
    select: dict[str, str] | None = None  # key=value: only the JSON objects with these entries


def numbers_in(text: str) -> list[Number]:
    """Every number in a piece of text; in "[a, b%]" both are percentages."""
    in_percent_group = [(m.start(), m.end()) for m in PERCENT_GROUP.finditer(text)]
    found = []
    for m in NUMBER.finditer(text):
        sign, whole, fraction, exponent, percent = m.groups()
        fraction, exponent = fraction or "", exponent or ""
        value = Decimal(sign + whole.replace(",", "") + fraction + exponent)
        quantum = Decimal(1).scaleb(-len(fraction[1:]) + (int(exponent[1:]) if exponent else 0))
        grouped = any(a <= m.start() < b for a, b in in_percent_group)
        found.append(Number(m.group(0), value, quantum, bool(percent) or grouped))
    return found


def is_numeric(cell: str) -> bool:
    """A cell that states a number: it starts with one (after bold and code marks)."""
    return re.match(r"[-+]?\.?\d", cell.replace("**", "").replace("`", "").strip()) is not None


def split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())
    return [c.strip() for c in cells[1:-1]]


def tables_in(path: Path) -> list[Table]:
    """The tables of a markdown page, each with the results files its Source line names."""
    lines = path.read_text().splitlines()
    page = str(path.relative_to(ROOT))
    tables, fenced, i = [], False, 0
    outside = []  # per line: outside a fenced block
    for line in lines:
        if line.strip().startswith("```"):
            fenced = not fenced
            outside.append(False)
            continue
        outside.append(not fenced)
    while i < len(lines):
        if (
            outside[i]
            and lines[i].strip().startswith("|")
            and i + 1 < len(lines)
            and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip())
        ):
            start = i
            i += 2
            rows = []
            while i < len(lines) and outside[i] and lines[i].strip().startswith("|"):
                rows.append(split_row(lines[i]))
                i += 1
            tables.append(Table(page, start + 1, lines[start].strip(), rows, start, i))
        else:
            i += 1
    claimed = set()

    def source_at(j: int) -> tuple[list[str], dict[str, str]] | None:
        if 0 <= j < len(lines) and outside[j] and (m := SOURCE.match(lines[j].strip())):
            return SOURCE_PATH.findall(m.group(1)), dict(SELECT.findall(m.group(1)))
        return None

    def next_text_line(j: int, step: int) -> int:
        while 0 <= j < len(lines) and not lines[j].strip():
            j += step
        return j

    for table in tables:  # below first
        j = next_text_line(table.end, 1)
        if (found := source_at(j)) is not None:
            (table.sources, table.select), _ = found, claimed.add(j)
    for table in tables:  # then above, if the line is not the Source of the table above it
        j = next_text_line(table.start - 1, -1)
        if table.sources is None and j not in claimed and (found := source_at(j)) is not None:
            (table.sources, table.select), _ = found, claimed.add(j)
    return tables


class Values:
    """The numbers of a results file, sorted, for rounding look-ups."""

    def __init__(self, numbers: list[Decimal]):
        self.sorted = sorted(numbers)

    def near(self, value: Decimal, half: Decimal) -> bool:
        i = bisect.bisect_left(self.sorted, value - half)
        return i < len(self.sorted) and self.sorted[i] <= value + half

    def holds(self, number: Number) -> bool:
        """Whether some stored number rounds to `number` at its printed precision."""
        half = number.quantum / 2 * Decimal("1.000001")
        if self.near(number.value, half):
            return True
        return number.percent and self.near(number.value / 100, half / 100)


RAW_ARRAY = 64  # a list of more numbers than this (a head map, per-trial scores) is raw data


def _numeric_count(data) -> int | None:
    """How many numbers a list of numbers (or of such lists) holds; None if it holds anything else."""
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return 1
    if isinstance(data, list):
        counts = [_numeric_count(v) for v in data]
        return None if None in counts else sum(counts)
    return None


def _json_numbers(data) -> list[Decimal]:
    """Every number of a JSON document, numbers in strings included, raw arrays left out: a
    table quotes summaries, and a head map's hundreds of scores would match almost any figure."""
    if isinstance(data, list) and (_numeric_count(data) or 0) > RAW_ARRAY:
        return []
    if isinstance(data, bool) or data is None:
        return []
    if isinstance(data, (int, float)):
        return [Decimal(repr(data))] if data == data and abs(data) != float("inf") else []
    if isinstance(data, str):
        return [n.value for n in numbers_in(data)]
    if isinstance(data, dict):
        return [x for v in data.values() for x in _json_numbers(v)]
    if isinstance(data, list):
        return [x for v in data for x in _json_numbers(v)]
    return []


def _selected(data, select: dict[str, str]) -> list:
    """The JSON objects, anywhere in `data`, whose entries include every key=value of `select`."""
    if isinstance(data, dict):
        if all(key in data and str(data[key]) == value for key, value in select.items()):
            return [data]
        return [x for v in data.values() for x in _selected(v, select)]
    if isinstance(data, list):
        return [x for v in data for x in _selected(v, select)]
    return []


def values_of(path: Path, select: dict[str, str] | None = None) -> Values:
    """The numbers of a results file; with `select`, of the JSON objects it picks only."""
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return Values(_json_numbers(_selected(data, select) if select else data))
    if select:
        raise ValueError(f"{path}: key=value selects JSON objects; this is not a JSON file")
    return Values([n.value for n in numbers_in(path.read_text())])


def unmatched(table: Table, values: Values) -> list[str]:
    """The numbers of the table's numeric cells that the values do not hold, as 'row: number'."""
    misses = []
    for row in table.rows:
        for cell in row:
            if is_numeric(cell):
                misses += [f"{row[0]!r}: {n.text} (in {cell!r})" for n in numbers_in(cell) if not values.holds(n)]
    return misses


def all_tables() -> list[Table]:
    return [t for page in PAGES for t in tables_in(page)]


def check(table: Table) -> list[str]:
    """What is wrong with one table: no Source line for measured numbers, a missing file, numbers
    not in its files."""
    where = f"{table.page}:{table.line} {table.header[:60]!r}"
    measured = any(is_numeric(c) for row in table.rows for c in row)
    if table.sources is None:
        if measured and (table.page, table.header) not in NOT_MEASURED:
            return [f"{where}: measured numbers and no 'Source: experiments/results/...' line"]
        return []
    if not table.sources:
        return [f"{where}: its Source line names no experiments/results/ file"]
    missing = [s for s in table.sources if not (ROOT / s).is_file()]
    if missing:
        return [f"{where}: Source file not found: {', '.join(missing)}"]
    values = table_values(table)
    if not values.sorted:
        return [f"{where}: no numbers in {', '.join(table.sources)} {table.select or ''}"]
    return [f"{where}: {miss}" for miss in unmatched(table, values)]


def table_values(table: Table) -> Values:
    return Values([x for s in table.sources for x in values_of(ROOT / s, table.select).sorted])


# --- the matcher -----------------------------------------------------------------------------


def test_numbers_are_read_as_printed():
    found = {n.text: (n.value, n.quantum, n.percent) for n in numbers_in("0.832 83% 1,000 -0.08 6.2e-05 18-6 [5.2, 7.8%] 1.00x")}
    assert found["0.832"] == (Decimal("0.832"), Decimal("0.001"), False)
    assert found["83%"] == (Decimal(83), Decimal(1), True)
    assert found["1,000"] == (Decimal(1000), Decimal(1), False)
    assert found["-0.08"] == (Decimal("-0.08"), Decimal("0.01"), False)
    assert found["6.2e-05"] == (Decimal("6.2e-05"), Decimal("1e-6"), False)
    assert found["5.2"] == (Decimal("5.2"), Decimal("0.1"), True)  # inside "[..., 7.8%]"
    assert found["1.00"][0] == 1
    assert [n.text for n in numbers_in("18-6 qwen2.5 bf16 h100")] == ["18", "6"]  # names are not numbers
    assert [n.text for n in numbers_in("0.00-0.08, 4% / 82% of 47")] == ["0.00", "0.08", "4%", "82%", "47"]
    assert [n.text for n in numbers_in("84e41bb9")] == ["84"]  # a hash is not an exponent


def test_the_matcher_rounds_to_the_printed_precision_and_a_changed_digit_fails():
    values = Values(_json_numbers({"recall": 0.8318, "kept": [0.5714285714285714], "n": 1000, "trials": "27/30", "x": 6.2e-05}))
    for text in ["0.832", "0.83", "83.2%", "83%", "57%", "0.571", "1,000", "27", "30", "6.2e-05"]:
        assert all(values.holds(n) for n in numbers_in(text)), text
    for text in ["0.833", "0.842", "83.3%", "84%", "58%", "0.572", "1,001", "28", "6.3e-05"]:
        assert not all(values.holds(n) for n in numbers_in(text)), text


def test_a_table_without_a_source_line_fails_and_one_with_a_wrong_digit_fails(tmp_path, monkeypatch):
    results = tmp_path / "experiments" / "results"
    results.mkdir(parents=True)
    (results / "r.json").write_text(json.dumps({"rows": [{"recall": 0.7368421, "kept": 0.9166667}]}))
    table = "| set | recall | kept |\n|---|---|---|\n| world | {} | {} |\n"
    page = tmp_path / "page.md"
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    page.write_text(table.format("0.737", "92%") + "\nSource: experiments/results/r.json\n")
    assert [check(t) for t in tables_in(page)] == [[]]
    page.write_text(table.format("0.738", "92%") + "\nSource: experiments/results/r.json\n")
    assert any("0.738" in problem for problem in check(tables_in(page)[0]))
    page.write_text(table.format("0.737", "93%") + "\nSource: experiments/results/r.json\n")
    assert any("93%" in problem for problem in check(tables_in(page)[0]))
    page.write_text(table.format("0.737", "92%"))
    assert "no 'Source" in check(tables_in(page)[0])[0]
    page.write_text(table.format("0.737", "92%") + "\nSource: experiments/results/absent.json\n")
    assert "not found" in check(tables_in(page)[0])[0]
    page.write_text("```\n" + table.format("0.1", "2%") + "```\n")  # program output in a code block
    assert tables_in(page) == []


def test_key_value_words_narrow_a_json_source_to_its_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    entries = [{"model": "a", "set": "x", "recall": 0.832}, {"model": "b", "set": "x", "recall": 0.5}]
    (tmp_path / "experiments" / "results" / "r.json").write_text(json.dumps(entries))
    page = tmp_path / "page.md"
    table = "| method | recall |\n|---|---|\n| one | {} |\n\nSource: experiments/results/r.json {}\n"
    page.write_text(table.format("0.832", "model=a set=x"))
    assert check(tables_in(page)[0]) == []
    page.write_text(table.format("0.832", "model=b"))  # the number is another entry's
    assert "0.832" in check(tables_in(page)[0])[0]
    page.write_text(table.format("0.832", "model=c"))
    assert "no numbers" in check(tables_in(page)[0])[0]


def test_a_source_line_between_two_tables_belongs_to_the_one_above(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    page = tmp_path / "page.md"
    block = "| a | b |\n|---|---|\n| x | 1 |\n"
    page.write_text(block + "\nSource: experiments/results/one.json\n\n" + block)
    first, second = tables_in(page)
    assert first.sources == ["experiments/results/one.json"] and second.sources is None


def test_changing_one_digit_of_a_backed_docs_table_is_caught():
    """On the real pages: in the first backed table, each number of its first numeric cell with a
    decimal point, changed in its last digit, is flagged for at least one of the nine changes."""
    table = next(t for t in all_tables() if t.sources and not check(t))
    values = table_values(table)
    cell = next(c for row in table.rows for c in row if is_numeric(c) and "." in c)
    number = next(n for n in numbers_in(cell) if n.quantum < 1)
    changed = []
    for digit in "0123456789":
        if digit != number.text.rstrip("%")[-1]:
            text = number.text.rstrip("%")[:-1] + digit + ("%" if number.text.endswith("%") else "")
            changed.append(Table(table.page, table.line, table.header, [[cell.replace(number.text, text, 1)]]))
    assert any(unmatched(t, values) for t in changed), (table.page, cell)


def test_summarize_run_writes_what_a_docs_table_reads_back(tmp_path):
    """experiments/summarize_run.py turns a run's results file into a small summary whose numbers
    a table can cite: here a trimmed SmolLM2 detection (18 heads >= 0.1, 18-6 first)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    summarize_run = pytest.importorskip("summarize_run")
    out = tmp_path / "summary.json"
    summarize_run.main([str(ROOT / "tests" / "data" / "smollm2-135m-small.json"), str(out)])
    summary = json.loads(out.read_text())
    assert (summary["experiment"], summary["n_heads"], summary["n_above_threshold"]) == ("detection", 270, 18)
    assert summary["top"][0][:2] == [18, 6] and summary["bootstrap"]["heads"][0] == "18-6"
    values = values_of(out)
    assert all(values.holds(n) for n in numbers_in(f"{summary['top'][0][2]:.3f} 6.7%"))


def test_summarize_run_of_an_ablation_holds_its_summary_rows(tmp_path):
    """On the planted model: the summary of an `ablation.json` holds each condition's mean recall,
    so a table quoting it passes and one with a changed digit fails."""
    from planted import NEEDLE, build_planted_model, haystack_text

    from rh_lens.detection.records import DetectionResult, TrialRecord
    from rh_lens.execution.options import RunOptions
    from rh_lens.interventions.masking import MaskingOptions, ablation_experiment
    from rh_lens.tasks.niah import build_trial, tokenize_haystack

    sys.path.insert(0, str(ROOT / "experiments"))
    summarize_run = pytest.importorskip("summarize_run")
    model = build_planted_model()
    haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
    trials = [build_trial(model.tokenizer, haystack, NEEDLE, 300, depth) for depth in (0, 50, 100)]
    record = dict(key="t", context_length=300, depth=50, needle_id="n", haystack="h", answer=None, generated_ids=[])
    record |= dict(response=None, rouge_recall=1.0, success=True, answer_span=None)
    ranking = DetectionResult("planted", 2, 4, [TrialRecord(**record, head_scores=[[0.0] * 4, [0.0, 0.05, 0.9, 0.0]])])
    run = tmp_path / "run"
    options = RunOptions(max_new_tokens=6, progress=False)
    ablation_experiment(model, trials, ranking, MaskingOptions(ks=(1,), seeds=(0,)), out_dir=run, options=options)
    summary = tmp_path / "summary.json"
    summarize_run.main([str(run / "ablation.json"), str(summary)])
    rows = {row["condition"]: row for row in json.loads(summary.read_text())["rows"]}
    assert rows["none"]["mean_recall"] == 1.0 and rows["top-1"]["mean_recall"] < 0.5
    values = values_of(summary)
    top = f"{rows['top-1']['mean_recall']:.3f}"
    assert values.holds(numbers_in(top)[0])
    changed = top[:-1] + str((int(top[-1]) + 5) % 10)
    assert not values.holds(numbers_in(changed)[0])


# --- the pages -------------------------------------------------------------------------------


def test_the_allowlist_names_tables_that_exist():
    headers = {(t.page, t.header) for t in all_tables()}
    assert set(NOT_MEASURED) <= headers, set(NOT_MEASURED) - headers


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_number_in_a_docs_table_is_in_its_results_file(page):
    problems = [p for t in tables_in(page) for p in check(t)]
    assert not problems, "\n".join(problems)
