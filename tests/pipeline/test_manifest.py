from pathlib import Path

import pytest

from extract.errors import ManifestError
from pipeline.manifest import load_manifest, parse_shard


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "b.svs").write_bytes(b"x")
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path, monkeypatch):
    path = write(tmp_path, "slide_id,path,label,mpp\nA,a.svs,tumor,0.25\nB,b.svs,normal,\n")
    monkeypatch.chdir("/")
    m = load_manifest(path, require=("path", "label"))
    assert [r.slide_id for r in m] == ["A", "B"]
    assert m.rows[0].path == tmp_path / "a.svs"
    assert m.rows[0].mpp == 0.25 and m.rows[1].mpp is None
    assert m.rows[0].label == "tumor"


def test_every_problem_is_reported_at_once_with_its_line(tmp_path):
    path = write(
        tmp_path,
        "slide_id,path,label,mpp,event\n"
        "A,a.svs,tumor,0.25,1\n"
        "A,b.svs,tumor,abc,1\n"          # duplicate id, bad mpp
        "bad/id,missing.svs,normal,,2\n"  # unsafe id, missing file, bad event
        "C,b.svs,,,\n",                   # empty required label
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path, require=("path", "label"))
    text = str(info.value)
    assert "line 3" in text and "duplicate slide_id" in text
    assert "'mpp' must be a number" in text
    assert "line 4" in text and "slide_id must use only" in text
    assert "slide file not found" in text and "missing.svs" in text
    assert "'event' must be 0" in text
    assert "line 5" in text and "empty 'label'" in text
    assert not any(p.suffix == ".h5" for p in tmp_path.iterdir())  # nothing written


def test_headerless_csv_is_refused_instead_of_losing_a_row(tmp_path):
    path = write(tmp_path, "A,a.svs,tumor\nB,b.svs,normal\n")
    with pytest.raises(ManifestError, match="no 'slide_id' column"):
        load_manifest(path)


def test_missing_required_column_and_missing_file(tmp_path):
    path = write(tmp_path, "slide_id,path\nA,a.svs\n")
    with pytest.raises(ManifestError, match="missing required column 'label'"):
        load_manifest(path, require=("label",))
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "nope.csv")


def test_shards_split_the_manifest_deterministically(tmp_path):
    rows = "".join(f"S{i},a.svs\n" for i in range(10))
    m = load_manifest(write(tmp_path, "slide_id,path\n" + rows))
    parts = [m.shard(*parse_shard(f"{i}/3")).slide_ids for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(m.slide_ids)
    assert parts[0] == ["S0", "S3", "S6", "S9"]
    with pytest.raises(ManifestError, match="--shard"):
        parse_shard("3/3")


@pytest.mark.parametrize("text, expected", [
    ("slide_id;path;label\nA;a.svs;x\n", "separated by ';'; save the manifest as a comma-separated CSV"),
    ("slide_id\tpath\nA\ta.svs\n", "separated by tabs"),
    ("Slide_ID,Path,Label\nA,a.svs,x\n", "column names must be lower case; rename 'Slide_ID' to 'slide_id', 'Path' to 'path'"),
    ("", "the file is empty; the first line must be a header"),
])
def test_common_spreadsheet_exports_get_a_message_that_says_what_to_do(tmp_path, text, expected):
    with pytest.raises(ManifestError, match=None) as err:
        load_manifest(write(tmp_path, text))
    assert expected in str(err.value) and str(tmp_path / "manifest.csv") in str(err.value)


def test_a_folder_given_as_manifest_is_named_as_such(tmp_path):
    with pytest.raises(ManifestError, match="is a folder; pass the manifest CSV file inside it"):
        load_manifest(tmp_path)


def test_a_row_with_an_extra_field_is_refused_not_shifted(tmp_path):
    # pandas would take the first field as an index and shift every column by one
    path = write(tmp_path, "slide_id,path,label\nA,a.svs,tumor\nB,b.svs,normal,extra\n")
    with pytest.raises(ManifestError, match=r"line 3: 4 field\(s\) but the header has 3"):
        load_manifest(path, require=("path", "label"))


def test_a_duplicate_header_column_is_refused(tmp_path):
    path = write(tmp_path, "slide_id,path,label,label\nA,a.svs,tumor,normal\n")
    with pytest.raises(ManifestError, match="column 'label' appears twice"):
        load_manifest(path)


def test_labels_are_compared_as_written_with_a_warning_for_equal_numbers(tmp_path, caplog):
    path = write(tmp_path, "slide_id,path,label\nA,a.svs,1\nB,b.svs,1.0\nC,a.svs, 1\nD,b.svs,0\n")
    m = load_manifest(path)
    assert [r.label for r in m] == ["1", "1.0", "1", "0"]  # surrounding spaces are not part of a label
    assert "'1', '1.0' are different classes as written" in caplog.text


def test_slide_id_length_and_mpp_range_are_checked_up_front(tmp_path):
    long_id = "s" * 260
    path = write(tmp_path, f"slide_id,path,mpp\n{long_id},a.svs,0.25\nB,b.svs,1000\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert "slide_id is 260 characters long; at most 200" in str(info.value)
    assert "'mpp' 1000 is outside 0.05-20" in str(info.value) and "--no-mpp-check" in str(info.value)
    path = write(tmp_path, "slide_id,path,mpp\nB,b.svs,1000\n")
    assert load_manifest(path, check_mpp=False).rows[0].mpp == 1000.0
