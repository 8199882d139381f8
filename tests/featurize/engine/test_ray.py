"""embed --engine ray on a local Ray (2 CPUs): same cache as one process, a dead actor's shard resumes,
a second driver is refused."""
import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")

from featurize.cache import read_cache  # noqa: E402
from core.errors import CacheError  # noqa: E402
from featurize.engine.extract import embed, final_cache_paths  # noqa: E402
from featurize.engine.ray_engine import embed_ray  # noqa: E402
from featurize.tables.table import read_table  # noqa: E402

KW = dict(random_init=True, batch_size=16, num_workers=0)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _same(a, b):
    ca, cb = read_cache(a), read_cache(b)
    assert list(ca.ids) == list(cb.ids)
    assert ca.features.tobytes() == cb.features.tobytes()


def test_two_actors_give_the_single_process_cache(local_ray, syn_table, tmp_path):
    one = embed(syn_table, ["timm:test_vit"], cache_dir=tmp_path / "one", progress=False, **KW)[0]
    out = embed_ray(syn_table, ["timm:test_vit"], shards=3, progress=False, cache_dir=tmp_path / "ray", **KW)
    assert len(out) == 1 and out[0].name == one.name
    _same(one, out[0])


def test_a_dead_actor_s_shard_resumes_and_ends_with_the_same_bytes(local_ray, syn_table, tmp_path, capsys):
    one = embed(syn_table, ["timm:test_vit"], cache_dir=tmp_path / "one", progress=False, **KW)[0]
    out = embed_ray(syn_table, ["timm:test_vit"], shards=2, progress=False, cache_dir=tmp_path / "ray",
                    _fail_once=1, **KW)
    assert "actor died" in capsys.readouterr().err
    _same(one, out[0])


def test_a_second_driver_is_refused(local_ray, syn_table, tmp_path):
    """Another process holds the driver lock (as a running driver does): this driver is refused."""
    import subprocess
    import sys

    final = final_cache_paths(read_table(syn_table), ["timm:test_vit"], random_init=True, cache_dir=tmp_path)[0]
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = final.with_name(final.name + ".driver.lock")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from core.lock import file_lock\nwith file_lock(Path(sys.argv[1])):\n"
                               "    print('held', flush=True); time.sleep(60)", str(lock)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheError, match="another hexpress process"):
            embed_ray(syn_table, ["timm:test_vit"], shards=2, progress=False, cache_dir=tmp_path, **KW)
    finally:
        holder.kill()
        holder.wait()
    assert not final.exists()
