"""The package's shape: no import circles (the layers between stages are import-linter's
contract in pyproject.toml, run by the test command)."""

from __future__ import annotations

import grimp


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("fmnist")
    imports = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for imported in sorted(imports[module]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join(path[path.index(imported):] + [module, imported]))
            elif imported not in state:
                visit(imported, path + [module])
        state[module] = "done"

    for module in sorted(imports):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)
