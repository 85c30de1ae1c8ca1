"""The demo's task (shvit_torch.data.canvas): three distinct digit scans on a canvas, labelled by
the largest. Deterministic from the seed, labels right by construction, test canvases built
only from scans no training canvas uses, every digit inside the crop the model sees. About 2 s.
"""
import numpy as np
import pytest
from sklearn.datasets import load_digits

from shvit_numpy.preprocess import preprocess_pil, resize_size
from shvit_torch import data, demo

DIGITS = load_digits()


@pytest.fixture(scope="module")
def specs():
    return data.canvas_split_specs((300, 120), seed=0)


@pytest.fixture(scope="module")
def inks():
    return data.digit_inks(DIGITS.images)


def test_the_same_seed_gives_the_same_canvases_and_another_seed_others(specs, inks):
    again = data.canvas_split_specs((300, 120), seed=0)
    assert again == specs
    other = data.canvas_split_specs((300, 120), seed=1)
    assert other[0] != specs[0] and other[1] != specs[1]
    a, b = (np.asarray(data.render_canvas(inks, specs[1][0])) for _ in range(2))
    np.testing.assert_array_equal(a, b)  # the noise too
    assert data.canvas_split_specs((20, 5), seed=0)[0] == specs[0][:20]  # more canvases extend, not reshuffle


def test_labels_are_the_largest_of_three_distinct_digits(specs):
    for spec in specs[0] + specs[1]:
        assert len(spec.digits) == 3 == len(set(spec.digits)) == len(spec.scans) == len(spec.corners)
        assert tuple(int(DIGITS.target[i]) for i in spec.scans) == spec.digits  # each scan is of its digit
        assert data.CANVAS_CLASSES[spec.label] == str(max(spec.digits))
    counts = np.bincount([s.label for s in specs[0]], minlength=len(data.CANVAS_CLASSES))
    assert len(counts) == 8 and counts.min() > 300 / 8 / 2  # every class, roughly balanced


def test_test_canvases_use_only_scans_no_training_canvas_uses(specs):
    idx_train, idx_test = data.digits_split(DIGITS.target)
    train_scans = {i for s in specs[0] for i in s.scans}
    test_scans = {i for s in specs[1] for i in s.scans}
    assert train_scans <= set(idx_train.tolist()) and test_scans <= set(idx_test.tolist())
    assert not train_scans & test_scans


def test_digits_do_not_overlap_and_stay_inside_the_crop(specs, inks):
    size, res, d = resize_size(data.CANVAS_RES), data.CANVAS_RES, data.DIGITS_RENDER
    left = round((size - res) / 2)  # preprocess_pil's centre crop
    for spec in specs[1][:40]:
        for k, (t, le) in enumerate(spec.corners):
            assert left <= t and t + d <= left + res and left <= le and le + d <= left + res
            for t2, l2 in spec.corners[k + 1:]:
                assert abs(t - t2) >= d or abs(le - l2) >= d
        grey = np.asarray(data.render_canvas(inks, spec).convert("L"))
        assert grey.shape == (size, size)
        ink = grey < 100  # noise is 12 grey levels: far from 100 on white paper
        boxes = np.zeros_like(ink)
        for t, le in spec.corners:
            boxes[t:t + d, le:le + d] = True
            assert ink[t:t + d, le:le + d].sum() > 20  # each digit is drawn
        assert not (ink & ~boxes).any()  # and nothing else


def test_canvas_dataset_is_the_preprocessed_canvases(inks):
    ds = data.canvas(sizes=(6, 4))
    assert ds.train.x.shape == (6, 3, 128, 128) and ds.test.x.shape == (4, 3, 128, 128) and ds.resolution == 128
    assert ds.classes == [str(d) for d in range(2, 10)] == data.class_names("canvas")
    train_specs, test_specs = data.canvas_split_specs((6, 4))
    assert ds.test.y.tolist() == [s.label for s in test_specs]
    np.testing.assert_array_equal(ds.test.x[1].numpy(), preprocess_pil(data.render_canvas(inks, test_specs[1]), 128))
    small = data.load("canvas", 64, limit=3)
    assert small.train.x.shape == (3, 3, 64, 64) and small.test.y.tolist() == [s.label for s in test_specs[:3]]


def test_the_attention_figure_queries_the_token_under_a_digit():
    left = round((resize_size(128) - 128) / 2)
    assert demo.token_of((left, left), 4, 128) == 0  # a digit in the top-left 32x32 token
    assert demo.token_of((left + 96, left + 32), 4, 128) == 3 * 4 + 1  # centre at (112, 48) in the crop
    assert demo.token_of((left + 96, left + 96), 2, 128) == 3  # stage 3's 2x2 grid


def test_attention_on_ink_is_the_share_on_tokens_under_digits():
    left = round((resize_size(128) - 128) / 2)
    spec = data.CanvasSpec((0, 0, 0), (9, 1, 2), ((left, left), (left + 70, left + 80), (left, left + 96)), 0)
    assert demo.ink_tokens(spec, 4, 128) == [0, 3, 8 + 2, 8 + 3, 12 + 2, 12 + 3]  # aligned: 1 token; straddling: 4
    a = np.zeros((1, 16, 16), np.float32)
    a[0, 0, [0, 5]] = 0.75, 0.25  # the 9's token: 3/4 on itself, 1/4 on background
    shares = demo.attention_on_ink({"layer": a}, [spec], 4, 128)
    assert shares == pytest.approx({"layer": 0.75, "uniform": 6 / 16})
