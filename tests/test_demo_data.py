import json

from expertkit.config import DomainConfig, config_from_dict
from expertkit.data import load_corpus
from expertkit.demo import DEMO_DOMAINS, demo_config
from expertkit.demo_data import write_demo_corpora


def test_demo_text_comes_from_this_python_installation(tmp_path):
    paths = write_demo_corpora(tmp_path)
    assert set(paths) == {"general", *DEMO_DOMAINS}
    for name, path in paths.items():
        corpus = load_corpus(DomainConfig(name=name, source={"path": str(path)}))
        assert len(corpus.splits["train"]) >= 10 and corpus.splits["test"], name
    code = [json.loads(line)["text"] for line in paths["code"].read_text().splitlines()]
    assert any("def " in doc and "\n\n" in doc for doc in code)  # whole files, blank lines kept
    config_from_dict(demo_config(paths))  # the demo's own config validates
