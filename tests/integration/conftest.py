import pytest
from cli_helpers import tiny_recipe


@pytest.fixture
def recipe_factory(tmp_path, tiny_teacher_dir):
    return lambda **sections: tiny_recipe(tmp_path, tiny_teacher_dir, **sections)
