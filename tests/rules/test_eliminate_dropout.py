"""eliminate_dropout: removed in deploy nets, outputs unchanged in real Caffe; kept when it names a net output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import graph_from_text, input_feed, run_caffe, save

from deeprebirth.rewrite import rewrite
from deeprebirth.rules import eliminate_dropout

INPUT = 'input: "data" input_shape { dim: 2 dim: 10 }\n'
IP = 'layer { name: "ip%d" type: "InnerProduct" bottom: "%s" top: "%s" inner_product_param { num_output: 6 } }\n'


def test_in_place_and_separate_dropouts_are_removed(tmp_path: Path) -> None:
    text = INPUT + IP % (1, "data", "a") + \
        'layer { name: "drop1" type: "Dropout" bottom: "a" top: "a" }\n' + IP % (2, "a", "b") + \
        'layer { name: "drop2" type: "Dropout" bottom: "b" top: "c" dropout_param { dropout_ratio: 0.3 } }\n' + \
        IP % (3, "c", "out")
    original = graph_from_text(text)
    graph = graph_from_text(text)
    report = rewrite(graph, (eliminate_dropout.RULE,))
    assert sorted(c.removed[0] for c in report.changes) == ["drop1", "drop2"]
    assert "Dropout" not in graph.layer_types()
    feed = input_feed(original)
    a = run_caffe(*save(original, tmp_path, "a"), feed, ["out"])["out"]
    b = run_caffe(*save(graph, tmp_path, "b"), feed, ["out"])["out"]
    assert np.array_equal(a, b)


def test_dropout_producing_a_net_output_hands_its_name_over(tmp_path: Path) -> None:
    text = INPUT + IP % (1, "data", "a") + 'layer { name: "drop" type: "Dropout" bottom: "a" top: "b" }'
    original = graph_from_text(text)
    graph = graph_from_text(text)
    report = rewrite(graph, (eliminate_dropout.RULE,))
    assert [c.removed for c in report.changes] == [["drop"]]
    assert [graph.caffe_name(b) for b in graph.outputs()] == ["b"]
    feed = input_feed(original)
    a = run_caffe(*save(original, tmp_path, "a"), feed, ["b"])["b"]
    b = run_caffe(*save(graph, tmp_path, "b"), feed, ["b"])["b"]
    assert np.array_equal(a, b)
