// Log-sum-exp merge of two attention results over disjoint rows of one sequence, with ATen ops
// (any device): the rule `decode_attention`'s segments merge by. A backend whose kernel reads one
// row source attends a tail as a second segment and merges here.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/logaddexp.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/where.h>

#include <limits>
#include <tuple>

namespace kvcompact {

// (out [B, Hq, Q, D], lse [B, Hq, Q]) of both parts -> the attention over their union. A query
// that sees neither part keeps out = 0, lse = -inf; a NaN in either part stays NaN.
inline std::tuple<at::Tensor, at::Tensor> merge_attention_parts(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                                const at::Tensor& out_b, const at::Tensor& lse_b) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  const at::Tensor lse = at::logaddexp(lse_a, lse_b);
  // exp(-inf - -inf) is NaN; a part a query does not see weighs 0.
  const at::Tensor w_a = at::where(at::eq(lse_a, neg_inf), 0.0, at::exp(at::sub(lse_a, lse))).unsqueeze(-1);
  const at::Tensor w_b = at::where(at::eq(lse_b, neg_inf), 0.0, at::exp(at::sub(lse_b, lse))).unsqueeze(-1);
  return {at::add(at::mul(out_a, w_a), at::mul(out_b, w_b)), lse};
}

}  // namespace kvcompact
