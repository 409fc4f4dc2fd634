"""Hot loops that framework ops do not cover, per backend, each with a plain-framework
reference implementation that the tests compare against."""
