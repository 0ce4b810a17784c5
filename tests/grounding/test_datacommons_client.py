"""The official ``datacommons-client`` pointed at our server (``url=``) works unchanged."""

from __future__ import annotations

from datacommons_client import DataCommonsClient

from grounding.server import start_server


def test_official_client_fetches_observations(stats_server, gapminder_truth):
    client = DataCommonsClient(url=stats_server.rest_url)  # construction probes /node for country/GTM
    response = client.observation.fetch(variable_dcids="LifeExpectancy_Person",
                                        entity_dcids=["country/KEN", "country/NGA"], date="LATEST")
    records = {(r["entity"], r["date"]): r for r in response.to_observation_records().model_dump()}
    assert records[("country/KEN", "2007")]["value"] == float(gapminder_truth[("Kenya", "2007")]["lifeExp"])
    assert records[("country/NGA", "2007")]["value"] == float(gapminder_truth[("Nigeria", "2007")]["lifeExp"])
    assert records[("country/KEN", "2007")]["importName"] == "Gapminder"
    assert records[("country/KEN", "2007")]["unit"] == "years"

    series = client.observation.fetch(variable_dcids="Count_Person", entity_dcids="country/JPN", date="")
    observations = series.byVariable["Count_Person"].byEntity["country/JPN"].orderedFacets[0].observations
    assert [(o.date, o.value) for o in observations] == [
        (year, float(row["pop"])) for (country, year), row in sorted(gapminder_truth.items()) if country == "Japan"]

    by_type = client.observation.fetch_observations_by_entity_type(
        date="LATEST", parent_entity="africa", entity_type="Country", variable_dcids="Count_Person")
    assert len(by_type.byVariable["Count_Person"].byEntity) == 52


def test_official_client_resolve_and_node(stats_server):
    client = DataCommonsClient(url=stats_server.rest_url)
    assert client.resolve.fetch_dcids_by_name("Kenya").to_flat_dict() == {"Kenya": "country/KEN"}
    # ranked candidates, best first: the gapminder series, then Systema Globalis' (general before female/male)
    indicators = client.resolve.fetch_indicators("life expectancy").to_flat_dict()["life expectancy"]
    assert indicators[:2] == ["LifeExpectancy_Person", "sg/life_expectancy_at_birth_data_from_ihme"]
    names = client.node.fetch_entity_names(["country/KEN", "africa"])
    assert names["country/KEN"].value == "Kenya" and names["africa"].value == "Africa"
    children = client.node.fetch_place_children("southamerica", children_type="Country", as_dict=True)
    assert "country/BRA" in {c["dcid"] for c in children["southamerica"]}
    assert client.node.fetch_place_parents("country/KEN")["country/KEN"][0]["dcid"] == "africa"


def test_official_client_sends_its_key(default_store):
    with start_server(default_store, api_key="official-client-key") as server:
        client = DataCommonsClient(api_key="official-client-key", url=server.rest_url)
        response = client.observation.fetch(variable_dcids="Count_Person", entity_dcids="country/KEN")
        assert response.byVariable["Count_Person"].byEntity["country/KEN"].orderedFacets[0].observations
