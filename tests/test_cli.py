"""The `vsearch` command line, run in-process: index, query, info and the documented exit codes."""

from __future__ import annotations

import json

import pytest

from vsearch_cli.main import EXIT_BAD_IMAGE, EXIT_FAILED, EXIT_NO_INDEX, EXIT_OK, EXIT_USAGE, main


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("VSEARCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VSEARCH_WEIGHTS", "random")
    monkeypatch.setenv("VSEARCH_IMAGE_SIZE", "64")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_index_query_info(env, demo_catalog, capsys):
    assert main(["query", str(demo_catalog.parent / "images" / "demo-004-1.jpg")]) == EXIT_NO_INDEX
    assert "vsearch index" in capsys.readouterr().err

    assert main(["index", str(demo_catalog)]) == EXIT_OK
    out = capsys.readouterr()
    assert "16 products, 20 images indexed, 0 images failed" in out.out
    assert "indexing" in out.err  # the progress bar

    assert main(["query", str(demo_catalog.parent / "images" / "demo-004-1.jpg"), "--top-k", "3", "--json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and rows[0]["id"] == "demo-004"
    assert set(rows[0]) == {"id", "title", "url", "image", "price", "score"}

    assert main(["info"]) == EXIT_OK
    info = json.loads(capsys.readouterr().out)
    assert info["products"] == 16 and info["weights"] == "random:seed0" and len(info["versions"]) == 1


def test_exit_codes(env, demo_catalog, capsys):
    assert main(["index", str(env / "missing.csv")]) == EXIT_USAGE
    assert "missing.csv" in capsys.readouterr().err

    (env / "nothing.csv").write_text("id,title,url,image\np1,Shoe,https://s.example/p1,nope.jpg\n")
    assert main(["index", str(env / "nothing.csv")]) == EXIT_FAILED
    assert "No image" in capsys.readouterr().err

    assert main(["index", str(demo_catalog)]) == EXIT_OK
    (env / "text.jpg").write_text("hello")
    assert main(["query", str(env / "text.jpg")]) == EXIT_BAD_IMAGE
    assert "error:" in capsys.readouterr().err


def test_bad_setting_names_the_variable(env, monkeypatch, capsys):
    monkeypatch.setenv("VSEARCH_PRECISION", "fp8")
    assert main(["info"]) == EXIT_USAGE
    assert "VSEARCH_PRECISION" in capsys.readouterr().err


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "exit codes" in capsys.readouterr().out
