"""``--lr auto``: the fine-tune's peak learning rate, measured on the training shard (:mod:`.probe`): how the
probe spends its budget (:mod:`.strategies`), the copies it trains and scores (:mod:`.runner`), and the check
of the winner against the method's dense phase (:mod:`.dense_check`)."""
