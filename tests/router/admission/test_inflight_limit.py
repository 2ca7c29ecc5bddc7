from app.router.admission import InflightLimit


def test_limit_admits_up_to_the_bound_and_frees_on_release():
    limit = InflightLimit(2)
    assert limit.try_acquire() and limit.try_acquire()
    assert not limit.try_acquire()
    limit.release()
    assert limit.try_acquire()


def test_no_limit_admits_everything():
    limit = InflightLimit(None)
    assert all(limit.try_acquire() for _ in range(10_000))
