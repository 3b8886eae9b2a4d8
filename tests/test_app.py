"""The app's pages run headless (streamlit.testing AppTest)."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def test_home_page_lists_the_registered_models():
    at = AppTest.from_file(APP, default_timeout=240)
    at.run()
    assert not at.exception, at.exception
    # restrict to two cheap families to keep the test short
    at.multiselect[0].set_value(["shardnet", "sharesnet"]).run()
    assert not at.exception
    df = at.dataframe[0].value
    assert {"shardnet_vgg", "sl_resnet34", "sharesnet50", "sharesnet_wrn40_4"} <= set(df["name"])
    row = df[df["name"] == "sharesnet50"].iloc[0]
    assert row["unique_params"] == 20_469_800 and row["effective_params"] == 25_557_032


def test_home_page_with_no_family_shows_a_hint():
    at = AppTest.from_file(APP, default_timeout=240)
    at.run()
    at.multiselect[0].set_value([]).run()
    assert not at.exception
    assert any("Choose at least one family" in i.value for i in at.info)
