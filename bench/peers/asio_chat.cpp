// SPDX-License-Identifier: MIT
// asio_chat — a chat server on standalone Asio, written the way Asio's own chat
// server example is written, but speaking cport's packets and keeping one room.
//
// Packets are { u16 size; u16 id; body }, little-endian, size counting the 4-byte
// header (4..65535). Every packet a client sends goes, unchanged, to every
// client in the room, the sender included, and each sender's packets arrive in
// the order it sent them.
//
// The shape is the example's: a room holds a std::set of participants; each
// session reads with asio::async_read, first the 4-byte header, then the rest of
// the packet, hands the packet to room.deliver() and reads the next header. Each
// session keeps a std::deque of outgoing packets and has one asio::async_write in
// flight at a time: deliver() appends and starts a write only when the deque was
// empty; the write's handler pops the front and writes the next one. So every
// delivery is its own async_write (one send() per packet per recipient).
//
// Where it differs from the example, and why:
//  * the deque holds shared pointers to one immutable packet instead of a copy
//    of the message per recipient (the example's chat_message is a 512-byte
//    array copied into every deque; cport packets go up to 64 KiB, and sharing is
//    what an Asio user who broadcasts to 1000 clients would do);
//  * no "recent messages" replay to a client that joins (the load generator
//    counts every packet it receives, so a replay would be a duplicate);
//  * --threads N: the example runs one thread. With N > 1 each session gets a
//    strand, the room's set is under a mutex, and deliver() reaches every other
//    session by posting to its strand. With one thread (the default, and what
//    bench/run.sh uses) there are no strands and deliver() is a direct call, as
//    in the example.
// The deques are unbounded, as in the example.
//
//   asio_chat --port P [--host H] [--threads N]     (default threads: 1)
//
// Prints "listening on H:P" once ready; exits 0 on SIGINT/SIGTERM; usage and
// exit 2 on bad arguments.
#define ASIO_STANDALONE 1
#define ASIO_NO_DEPRECATED 1
#include <asio.hpp>

#include <sys/resource.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

using asio::ip::tcp;

namespace {

constexpr std::size_t header_length = 4;

// One packet as it travels: header and body, shared by every recipient's deque.
using packet = std::vector<unsigned char>;
using packet_ptr = std::shared_ptr<const packet>;

class participant {
public:
    virtual ~participant() = default;
    virtual void deliver(const packet_ptr &p) = 0;
    virtual asio::any_io_executor executor() = 0;
};
using participant_ptr = std::shared_ptr<participant>;

class room {
public:
    explicit room(bool threaded) : threaded_(threaded) {}

    void join(const participant_ptr &p)
    {
        std::lock_guard<std::mutex> lk(mu_);
        participants_.insert(p);
    }
    void leave(const participant_ptr &p)
    {
        std::lock_guard<std::mutex> lk(mu_);
        participants_.erase(p);
    }
    void deliver(const packet_ptr &msg)
    {
        std::lock_guard<std::mutex> lk(mu_);
        for (const auto &p : participants_) {
            if (threaded_)
                asio::post(p->executor(), [p, msg] { p->deliver(msg); });
            else
                p->deliver(msg);
        }
    }

private:
    const bool threaded_;
    std::mutex mu_; // uncontended with one thread
    std::set<participant_ptr> participants_;
};

class session : public participant, public std::enable_shared_from_this<session> {
public:
    session(tcp::socket s, room &r) : sock_(std::move(s)), room_(r) {}

    void start()
    {
        room_.join(shared_from_this());
        do_read_header();
    }

    void deliver(const packet_ptr &p) override
    {
        bool write_in_progress = !write_msgs_.empty();
        write_msgs_.push_back(p);
        if (!write_in_progress)
            do_write();
    }

    asio::any_io_executor executor() override { return sock_.get_executor(); }

private:
    void do_read_header()
    {
        auto self = shared_from_this();
        asio::async_read(sock_, asio::buffer(header_), [this, self](std::error_code ec, std::size_t) {
            std::size_t size = static_cast<std::size_t>(header_[0]) | static_cast<std::size_t>(header_[1]) << 8;
            if (ec || size < header_length) {
                room_.leave(self);
                return;
            }
            do_read_body(size);
        });
    }

    void do_read_body(std::size_t size)
    {
        auto self = shared_from_this();
        auto msg = std::make_shared<packet>(size);
        std::memcpy(msg->data(), header_.data(), header_length);
        asio::async_read(sock_, asio::buffer(msg->data() + header_length, size - header_length),
                         [this, self, msg](std::error_code ec, std::size_t) {
                             if (ec) {
                                 room_.leave(self);
                                 return;
                             }
                             room_.deliver(msg);
                             do_read_header();
                         });
    }

    void do_write()
    {
        auto self = shared_from_this();
        const packet &p = *write_msgs_.front();
        asio::async_write(sock_, asio::buffer(p.data(), p.size()), [this, self](std::error_code ec, std::size_t) {
            if (ec) {
                room_.leave(self);
                return;
            }
            write_msgs_.pop_front();
            if (!write_msgs_.empty())
                do_write();
        });
    }

    tcp::socket sock_;
    room &room_;
    std::array<unsigned char, header_length> header_{};
    std::deque<packet_ptr> write_msgs_;
};

class server {
public:
    server(asio::io_context &io, const tcp::endpoint &ep, bool threaded)
        : io_(io), acc_(io), room_(threaded), threaded_(threaded)
    {
        acc_.open(ep.protocol());
        acc_.set_option(tcp::acceptor::reuse_address(true));
        acc_.bind(ep);
        acc_.listen(asio::socket_base::max_listen_connections);
        do_accept();
    }
    tcp::endpoint local() const { return acc_.local_endpoint(); }

private:
    void do_accept()
    {
        // With several threads each session's handlers run on its own strand.
        asio::any_io_executor ex = threaded_ ? asio::any_io_executor(asio::make_strand(io_))
                                             : asio::any_io_executor(io_.get_executor());
        acc_.async_accept(ex, [this](std::error_code ec, tcp::socket s) {
            if (!ec) {
                std::error_code ig;
                s.set_option(tcp::no_delay(true), ig);
                auto sess = std::make_shared<session>(std::move(s), room_);
                if (threaded_)
                    asio::post(sess->executor(), [sess] { sess->start(); });
                else
                    sess->start();
            }
            do_accept();
        });
    }
    asio::io_context &io_;
    tcp::acceptor acc_;
    room room_;
    const bool threaded_;
};

void usage(std::FILE *f)
{
    std::fprintf(f, "usage: asio_chat --port P [--host H] [--threads N]\n"
                    "  standalone Asio chat server in the style of Asio's chat_server example: every\n"
                    "  packet {u16 size,u16 id,body} from any client goes to every client, one\n"
                    "  async_write per packet per client, one write in flight per client\n"
                    "  --host H      address to bind (default 0.0.0.0)\n"
                    "  --threads N   threads running the io_context (default 1)\n");
}

bool parse_long(const char *s, long lo, long hi, long &out)
{
    char *end;
    long v = std::strtol(s, &end, 10);
    if (*s == 0 || *end || v < lo || v > hi)
        return false;
    out = v;
    return true;
}

} // namespace

int main(int argc, char **argv)
{
    std::string host = "0.0.0.0";
    long port = -1;
    long threads = 1;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if (a == "-h" || a == "--help") {
            usage(stdout);
            return 0;
        }
        if (i + 1 >= argc) {
            usage(stderr);
            return 2;
        }
        const char *v = argv[++i];
        if (a == "--port") {
            if (!parse_long(v, 0, 65535, port)) {
                usage(stderr);
                return 2;
            }
        } else if (a == "--host") {
            host = v;
        } else if (a == "--threads") {
            if (!parse_long(v, 1, 256, threads)) {
                usage(stderr);
                return 2;
            }
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (port < 0) {
        usage(stderr);
        return 2;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    try {
        asio::io_context io(static_cast<int>(threads));
        std::error_code ec;
        auto addr = asio::ip::make_address(host, ec);
        if (ec) {
            std::fprintf(stderr, "asio_chat: bad host %s\n", host.c_str());
            return 2;
        }
        server srv(io, tcp::endpoint(addr, static_cast<unsigned short>(port)), threads > 1);
        asio::signal_set sigs(io, SIGINT, SIGTERM);
        sigs.async_wait([&io](std::error_code, int) { io.stop(); });
        auto ep = srv.local();
        std::printf("listening on %s:%u (asio %d.%d.%d, %ld thread%s)\n", ep.address().to_string().c_str(),
                    ep.port(), ASIO_VERSION / 100000, ASIO_VERSION / 100 % 1000, ASIO_VERSION % 100, threads,
                    threads == 1 ? "" : "s");
        std::fflush(stdout);
        std::vector<std::thread> pool;
        for (long i = 1; i < threads; i++)
            pool.emplace_back([&io] { io.run(); });
        io.run();
        for (auto &t : pool)
            t.join();
    } catch (const std::exception &e) {
        std::fprintf(stderr, "asio_chat: %s\n", e.what());
        return 1;
    }
    return 0;
}
