"""The report says which site's update the server refused, rejected or bounded, and why."""

from fedfm.report.collect import screening_rows
from fedfm.report.tables import screening_table


def test_refusals_rejections_and_bounded_updates_are_listed_with_their_reason():
    results = {"rounds": [
        {"round": 1, "refused": {"node 7": "rejected: site-1's update is 9000 bytes, above federation.max_update_bytes=1000: "
                                           "refused before decoding"}, "clipped": {"site-2": 512.0}},
        {"round": 2, "refused": {}, "clipped": {}},
        {"round": 3, "refused": {"node 3": "site-0 refuses the round: epsilon would reach 8.1 > budget 8.0"}},
    ]}
    table = screening_table({"screening": screening_rows(results)})
    assert [row[:2] for row in table.rows] == [["1", "node 7"], ["1", "site-2"], ["3", "node 3"]]
    assert "site-1's update is 9000 bytes" in table.rows[0][2] and "512 bounded" in table.rows[1][2]
    assert screening_table({"screening": screening_rows({"rounds": [{"round": 1, "refused": {}}]})}) is None
