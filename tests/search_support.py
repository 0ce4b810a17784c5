"""Shared by the variable search's stage tests (cross-encoder, language model): a small catalogue of near
twins (male/female, imports/exports) beside unrelated variables."""

from grounding.variable_index import VariableDoc

TWINS = [
    VariableDoc(dcid="Count_Person_Male", name="Male Population"),
    VariableDoc(dcid="Count_Person_Female", name="Female Population"),
    VariableDoc(dcid="Count_Person", name="Total Population"),
    VariableDoc(dcid="Amount_Exports_Goods", name="Value of Goods Exported"),
    VariableDoc(dcid="Amount_Imports_Goods", name="Value of Goods Imported"),
    VariableDoc(dcid="Median_Age_Person", name="Median Age of Population"),
    VariableDoc(dcid="Count_Household", name="Number of Households"),
    VariableDoc(dcid="Mean_Rainfall", name="Average Rainfall"),
]
