"""Many phones on one machine: the Simulation Engine runner and the `pocketfl` command."""
